//! Filesystem methods (`docs/PROTOCOL.md` section 8). Each function is blocking and
//! runs on a blocking thread; errors name the operation and the path.

use crate::sync::lock;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result, fs_error};
use crate::protocol::{WirePath, path_to_uri};

/// Streaming handles one connection may hold open.
pub const MAX_HANDLES: usize = 128;
/// Longest handle id, in bytes.
pub const MAX_HANDLE_ID: usize = 32;
/// Largest block one `fs/readBlock` returns (the reference's bound).
pub const MAX_BLOCK: usize = 1024 * 1024;
/// Most entries one `fs/readDirectory` answers (the reference's bound: a
/// longer answer would pass the 262,144 JSON values its client decodes).
pub const MAX_DIRECTORY_ENTRIES: usize = 50_000;

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathParams {
    pub path: WirePath,
    #[serde(default = "yes")]
    pub follow_symlinks: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteFileParams {
    pub path: WirePath,
    pub data_base64: String,
    #[serde(default = "yes")]
    pub follow_symlinks: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateDirectoryParams {
    pub path: WirePath,
    #[serde(default)]
    pub recursive: Option<bool>,
    /// One directory of mode 0700, made atomically (no parents).
    #[serde(default)]
    pub private: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoveParams {
    pub path: WirePath,
    #[serde(default)]
    pub recursive: Option<bool>,
    #[serde(default)]
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyParams {
    pub source_path: WirePath,
    pub destination_path: WirePath,
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenameParams {
    pub source_path: WirePath,
    pub destination_path: WirePath,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WalkParams {
    pub path: WirePath,
    #[serde(default)]
    pub options: WalkOptions,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WalkOptions {
    pub max_depth: usize,
    pub max_directories: usize,
    pub max_entries: usize,
    pub follow_directory_symlinks: bool,
    /// Directories whose name starts with `.` are listed, not entered.
    pub prune_hidden_directories: bool,
}

impl Default for WalkOptions {
    fn default() -> Self {
        use crate::protocol::{
            WALK_DEFAULT_MAX_DEPTH, WALK_DEFAULT_MAX_DIRECTORIES, WALK_DEFAULT_MAX_ENTRIES,
        };
        WalkOptions {
            max_depth: WALK_DEFAULT_MAX_DEPTH as usize,
            max_directories: WALK_DEFAULT_MAX_DIRECTORIES as usize,
            max_entries: WALK_DEFAULT_MAX_ENTRIES as usize,
            follow_directory_symlinks: false,
            prune_hidden_directories: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenParams {
    pub handle_id: String,
    pub path: WirePath,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadBlockParams {
    pub handle_id: String,
    pub offset: u64,
    pub len: usize,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandleParams {
    pub handle_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DirEntry {
    file_name: String,
    is_directory: bool,
    is_file: bool,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn shown(path: &Path) -> std::path::Display<'_> {
    path.display()
}

/// Open a regular file for reading without ever blocking on a FIFO or a
/// device: the open is non-blocking and anything but a regular file is
/// refused.
fn open_regular(path: &Path, follow: bool) -> Result<(File, fs::Metadata)> {
    let mut flags = libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| fs_error(format!("failed to open {}", shown(path)), &e))?;
    let meta = file
        .metadata()
        .map_err(|e| fs_error(format!("failed to stat {}", shown(path)), &e))?;
    if !meta.is_file() {
        // The reference's words; what it is travels in `data`.
        let (kind, errno) = match meta.is_dir() {
            true => ("isADirectory", Some(libc::EISDIR)),
            false => ("notARegularFile", None),
        };
        return Err(Error::InvalidInput {
            kind,
            message: format!("path `{}` is not a file", shown(path)),
            errno,
        });
    }
    Ok((file, meta))
}

/// `fs/readFile`. Files whose base64 would not fit in one message are
/// refused with a pointer to the streaming methods.
pub fn read_file(p: PathParams, max_message_bytes: usize) -> Result<Value> {
    let path = &p.path.0;
    let (file, meta) = open_regular(path, p.follow_symlinks)?;
    // The most raw bytes whose base64 fits one message. `stat` is only a
    // hint: files in /proc and /sys say 0 and can be endless, so the read
    // itself stops just past the limit (at a page boundary: some of them,
    // such as `pagemap`, refuse reads of odd sizes).
    let limit = (max_message_bytes.saturating_sub(64) / 4 * 3) as u64;
    // The reference's words, with this server's limit (what fits one
    // message); fs/open and fs/readBlock read any size.
    let too_large = || Error::InvalidInput {
        kind: "fileTooLarge",
        message: format!("file is too large to read: limit is {limit} bytes"),
        errno: None,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take((limit / 4096 + 1) * 4096)
        .read_to_end(&mut data)
        .map_err(|e| fs_error(format!("failed to read {}", shown(path)), &e))?;
    if data.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(json!({ "dataBase64": b64(&data) }))
}

/// Where a write through `path` lands: the final target of a symlink chain
/// when following links, else the path itself.
fn write_target(path: &Path, follow: bool) -> Result<PathBuf> {
    let mut target = path.to_path_buf();
    if !follow {
        return Ok(target);
    }
    for _ in 0..40 {
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&target)
                    .map_err(|e| fs_error(format!("failed to read link {}", shown(&target)), &e))?;
                target = match target.parent() {
                    Some(dir) => dir.join(link),
                    None => link,
                };
            }
            _ => return Ok(target),
        }
    }
    Err(fs_error(
        format!("failed to resolve {}", shown(path)),
        &io::Error::from_raw_os_error(libc::ELOOP),
    ))
}

/// `fs/writeFile`: write a temporary file beside the target, then rename it
/// over the target, so a reader sees the old file or the new one, never
/// half of one. An existing file's permission bits and owner are kept. A
/// file with more than one name (hard links) is written in place instead,
/// so that every name sees the new content, as the reference does.
pub fn write_file(p: WriteFileParams) -> Result<Value> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(p.data_base64.as_bytes())
        .map_err(|e| Error::InvalidInput {
            kind: "invalidBase64",
            message: format!("fs/writeFile requires valid base64 dataBase64: {e}"),
            errno: None,
        })?;
    let target = write_target(&p.path.0, p.follow_symlinks)?;
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_file() && m.nlink() > 1) {
        return write_in_place(&target, &data);
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target
        .file_name()
        .ok_or_else(|| Error::InvalidParams(format!("cannot write to {}", shown(&target))))?;
    let existing = fs::symlink_metadata(&target).ok().filter(|m| m.is_file());
    let (tmp_path, mut tmp) = create_temp(dir, name)?;
    let result = (|| {
        use std::io::Write;
        tmp.write_all(&data)?;
        if let Some(meta) = &existing {
            tmp.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            // Keeping the owner needs privileges; without them the new file
            // belongs to the server's user, as any editor's save would.
            let _ = std::os::unix::fs::fchown(&tmp, Some(meta.uid()), Some(meta.gid()));
        }
        fs::rename(&tmp_path, &target)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp_path);
        return Err(fs_error(
            format!("failed to write {}", shown(&target)),
            &err,
        ));
    }
    Ok(json!({}))
}

/// Truncate and write the file itself (its inode, and so every hard link
/// of it); never through a link planted at the last moment.
fn write_in_place(target: &Path, data: &[u8]) -> Result<Value> {
    use std::io::Write;
    let what = || format!("failed to write {}", shown(target));
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(|e| fs_error(what(), &e))?;
    file.write_all(data).map_err(|e| fs_error(what(), &e))?;
    Ok(json!({}))
}

fn create_temp(dir: &Path, name: &std::ffi::OsStr) -> Result<(PathBuf, File)> {
    let mut last = None;
    for attempt in 0..16u32 {
        let mut random = [0u8; 8];
        // SAFETY: getrandom fills a valid buffer.
        unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
        let suffix = u64::from_le_bytes(random) ^ u64::from(attempt);
        let tmp = dir.join(format!(".{}.{suffix:016x}.tmp", name.to_string_lossy()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => last = Some(err),
            Err(err) => return Err(fs_error(format!("failed to write in {}", shown(dir)), &err)),
        }
    }
    Err(fs_error(
        format!("failed to write in {}", shown(dir)),
        &last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EEXIST)),
    ))
}

/// `fs/createDirectory`: with its parents unless `recursive: false` (the
/// reference's default); `private`: one directory of mode 0700, made so
/// (mkdir with that mode, not chmod after), failing if it exists.
pub fn create_directory(p: CreateDirectoryParams) -> Result<Value> {
    let path = &p.path.0;
    if p.private && p.recursive == Some(true) {
        return Err(private_refused());
    }
    let result = if p.private {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().mode(0o700).create(path)
    } else if p.recursive.unwrap_or(true) {
        fs::create_dir_all(path)
    } else {
        fs::create_dir(path)
    };
    result.map_err(|e| fs_error(format!("failed to create directory {}", shown(path)), &e))?;
    Ok(json!({}))
}

/// `private` with `recursive: true` or a `sandbox`: the reference's refusal.
pub fn private_refused() -> Error {
    Error::InvalidInput {
        kind: "invalidInput",
        message: "private directories must be non-recursive and unsandboxed".into(),
        errno: None,
    }
}

fn millis(time: io::Result<std::time::SystemTime>) -> i64 {
    time.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `fs/getMetadata`. `isSymlink` says whether the path itself is a link;
/// the other fields describe its target when following links.
pub fn get_metadata(p: PathParams) -> Result<Value> {
    let path = &p.path.0;
    let what = || format!("failed to stat {}", shown(path));
    let link = fs::symlink_metadata(path).map_err(|e| fs_error(what(), &e))?;
    let meta = if p.follow_symlinks && link.file_type().is_symlink() {
        fs::metadata(path).map_err(|e| fs_error(what(), &e))?
    } else {
        link.clone()
    };
    Ok(json!({
        "isDirectory": meta.is_dir(),
        "isFile": meta.is_file(),
        "isSymlink": link.file_type().is_symlink(),
        "size": meta.len(),
        "createdAtMs": millis(meta.created()),
        "modifiedAtMs": millis(meta.modified()),
        "mode": meta.mode() & 0o7777,
    }))
}

/// `fs/readDirectory`: entries sorted by name; a link counts as what it
/// points to (a dangling one is neither file nor directory).
pub fn read_directory(p: PathParams) -> Result<Value> {
    let path = &p.path.0;
    let what = || format!("failed to read directory {}", shown(path));
    let mut entries = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| fs_error(what(), &e))? {
        let entry = entry.map_err(|e| fs_error(what(), &e))?;
        let mut file_type = entry.file_type().map_err(|e| fs_error(what(), &e))?;
        if file_type.is_symlink() {
            if let Ok(meta) = fs::metadata(entry.path()) {
                file_type = meta.file_type();
            }
        }
        entries.push(DirEntry {
            file_name: entry.file_name().to_string_lossy().into_owned(),
            is_directory: file_type.is_dir(),
            is_file: file_type.is_file(),
        });
    }
    if entries.len() > MAX_DIRECTORY_ENTRIES {
        return Err(Error::Internal {
            message: format!(
                "fs/readDirectory returned {} entries; limit is {MAX_DIRECTORY_ENTRIES}",
                entries.len()
            ),
            errno: None,
        });
    }
    entries.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(json!({ "entries": entries }))
}

/// `fs/remove`. A link is removed, never what it points to. `recursive` and
/// `force` default to true, as in the reference.
pub fn remove(p: RemoveParams) -> Result<Value> {
    let path = &p.path.0;
    let what = || format!("failed to remove {}", shown(path));
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound && p.force.unwrap_or(true) => {
            return Ok(json!({}));
        }
        Err(err) => return Err(fs_error(what(), &err)),
    };
    let result = if meta.is_dir() {
        if p.recursive.unwrap_or(true) {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| fs_error(what(), &e))?;
    Ok(json!({}))
}

/// `fs/copy`: a file (with its mode), a link as a link, or with
/// `recursive` a whole tree, whose special files (FIFOs, sockets, devices)
/// are left out. A directory's destination must not exist.
pub fn copy(p: CopyParams) -> Result<Value> {
    let (src, dst) = (&p.source_path.0, &p.destination_path.0);
    let what = || format!("failed to copy {} to {}", shown(src), shown(dst));
    let meta = fs::symlink_metadata(src).map_err(|e| fs_error(what(), &e))?;
    let kind = meta.file_type();
    if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
        return Err(Error::InvalidInput {
            kind: "notARegularFile",
            message: "fs/copy only supports regular files, directories, and symlinks".into(),
            errno: None,
        });
    }
    let into_itself = || Error::InvalidInput {
        kind: "invalidInput",
        message: "fs/copy cannot copy a directory to itself or one of its descendants".into(),
        errno: None,
    };
    if meta.is_dir() && same_file(src, dst) {
        return Err(into_itself());
    }
    if same_file(src, dst) {
        return Err(Error::InvalidInput {
            kind: "sameFile",
            message: format!("cannot copy {} onto itself", shown(src)),
            errno: None,
        });
    }
    if meta.is_dir() {
        if !p.recursive {
            return Err(Error::InvalidInput {
                kind: "isADirectory",
                message: "fs/copy requires recursive: true when sourcePath is a directory".into(),
                errno: Some(libc::EISDIR),
            });
        }
        if let (Ok(s), Some(parent)) = (fs::canonicalize(src), dst.parent()) {
            if fs::canonicalize(parent).is_ok_and(|d| d.starts_with(&s)) {
                return Err(into_itself());
            }
        }
    }
    if meta.is_dir() && fs::symlink_metadata(dst).is_ok() {
        return Err(fs_error(
            what(),
            &io::Error::from_raw_os_error(libc::EEXIST),
        ));
    }
    copy_into_place(src, dst, &meta, false).map_err(|e| fs_error(what(), &e))?;
    Ok(json!({}))
}

/// Copy `src` to `dst` under a temporary name beside it, then rename it
/// into place: a failed copy leaves no partial destination, and a reader
/// of the destination sees the old one or the whole new one. A directory
/// replaces an existing (empty) one only when `replace_directory`, as
/// `rename` would.
fn copy_into_place(
    src: &Path,
    dst: &Path,
    meta: &fs::Metadata,
    replace_directory: bool,
) -> io::Result<()> {
    let dir = dst.parent().unwrap_or(Path::new("/"));
    let name = dst
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let tmp = temp_name(dir, name);
    let result = copy_tree(src, &tmp, meta).and_then(|()| {
        if meta.is_dir() && !replace_directory {
            rename_no_replace(&tmp, dst)
        } else {
            fs::rename(&tmp, dst)
        }
    });
    if result.is_err() {
        let _ = if meta.is_dir() {
            fs::remove_dir_all(&tmp)
        } else {
            fs::remove_file(&tmp)
        };
    }
    result
}

/// A name for a temporary file beside `name` in `dir`, unlikely to exist.
fn temp_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let mut random = [0u8; 8];
    // SAFETY: getrandom fills a valid buffer.
    unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        u64::from_le_bytes(random)
    ))
}

/// Rename, failing with EEXIST when the destination exists (a plain
/// rename would replace an empty directory).
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn copy_tree(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)
    } else if kind.is_dir() {
        fs::create_dir(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            let child_meta = fs::symlink_metadata(entry.path())?;
            let child = child_meta.file_type();
            // FIFOs, sockets and devices are not copied (as the reference).
            if child.is_file() || child.is_dir() || child.is_symlink() {
                copy_tree(&entry.path(), &dst.join(entry.file_name()), &child_meta)?;
            }
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
    } else if kind.is_file() {
        fs::copy(src, dst).map(|_| ())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file, directory or link", src.display()),
        ))
    }
}

/// `fs/rename`; across filesystems it copies, then removes the source.
pub fn rename(p: RenameParams) -> Result<Value> {
    let (src, dst) = (&p.source_path.0, &p.destination_path.0);
    let what = || format!("failed to rename {} to {}", shown(src), shown(dst));
    match fs::rename(src, dst) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
            let meta = fs::symlink_metadata(src).map_err(|e| fs_error(what(), &e))?;
            copy_into_place(src, dst, &meta, true).map_err(|e| fs_error(what(), &e))?;
            let removed = if meta.is_dir() {
                fs::remove_dir_all(src)
            } else {
                fs::remove_file(src)
            };
            removed.map_err(|e| fs_error(what(), &e))?;
        }
        Err(err) => return Err(fs_error(what(), &err)),
    }
    Ok(json!({}))
}

/// `fs/canonicalize`: the absolute path with every link and `..` resolved.
pub fn canonicalize(p: PathParams) -> Result<Value> {
    let path = &p.path.0;
    let real = fs::canonicalize(path)
        .map_err(|e| fs_error(format!("failed to canonicalize {}", shown(path)), &e))?;
    Ok(json!({ "path": path_to_uri(&real) }))
}

/// `fs/walk`: breadth-first below `path` (not including it), within the
/// limits; `truncated` says a limit cut the walk short. Entry paths are
/// `file:` URIs and kinds `directory` or `file` (the reference's two): a
/// link counts as what it points to, and is entered only with
/// `followDirectorySymlinks`; a dangling link is left out, and so is
/// anything that is neither a directory nor a regular file.
pub fn walk(p: WalkParams) -> Result<Value> {
    let root = &p.path.0;
    let opts = &p.options;
    let root_meta =
        fs::metadata(root).map_err(|e| fs_error(format!("failed to walk {}", shown(root)), &e))?;
    if !root_meta.is_dir() {
        return Err(Error::InvalidInput {
            kind: "notADirectory",
            message: format!("{} is not a directory", shown(root)),
            errno: Some(libc::ENOTDIR),
        });
    }
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut truncated = false;
    let mut seen: HashSet<(u64, u64)> = HashSet::from([(root_meta.dev(), root_meta.ino())]);
    let mut queue: VecDeque<(PathBuf, usize)> = VecDeque::from([(root.clone(), 0)]);
    let mut directories_read = 0;
    'walk: while let Some((dir, depth)) = queue.pop_front() {
        if directories_read == opts.max_directories {
            truncated = true;
            break;
        }
        directories_read += 1;
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(err) => {
                errors.push(
                    json!({"path": path_to_uri(&dir), "message": crate::error::os_text(&err)}),
                );
                continue;
            }
        };
        let mut children: Vec<_> = listing.filter_map(|e| e.ok()).collect();
        children.sort_by_key(|e| e.file_name());
        for child in children {
            if entries.len() == opts.max_entries {
                truncated = true;
                break 'walk;
            }
            let path = child.path();
            let mut file_type = match child.file_type() {
                Ok(t) => t,
                Err(err) => {
                    errors.push(
                        json!({"path": path_to_uri(&path), "message": crate::error::os_text(&err)}),
                    );
                    continue;
                }
            };
            let link = file_type.is_symlink();
            if link {
                match fs::metadata(&path) {
                    Ok(meta) => file_type = meta.file_type(),
                    // Dangling (or a loop): not an entry.
                    Err(_) => continue,
                }
            }
            let kind = if file_type.is_dir() {
                "directory"
            } else if file_type.is_file() {
                "file"
            } else {
                continue;
            };
            entries.push(json!({"path": path_to_uri(&path), "kind": kind}));
            let hidden = child.file_name().as_encoded_bytes().starts_with(b".");
            let descend = file_type.is_dir()
                && (!link || opts.follow_directory_symlinks)
                && !(hidden && opts.prune_hidden_directories);
            if descend {
                if depth + 1 >= opts.max_depth {
                    truncated = true;
                    continue;
                }
                if let Ok(meta) = fs::metadata(&path) {
                    if seen.insert((meta.dev(), meta.ino())) {
                        queue.push_back((path, depth + 1));
                    }
                }
            }
        }
    }
    Ok(json!({ "entries": entries, "errors": errors, "truncated": truncated }))
}

/// Run a path-based filesystem method (every `fs/*` method but the
/// handle ones) on decoded params.
pub fn run_method(name: &str, params: Value, max_message_bytes: usize) -> Result<Value> {
    use crate::protocol::{decode, method};
    match name {
        method::FS_READ_FILE => read_file(decode(name, params)?, max_message_bytes),
        method::FS_WRITE_FILE => write_file(decode(name, params)?),
        method::FS_CREATE_DIRECTORY => create_directory(decode(name, params)?),
        method::FS_GET_METADATA => get_metadata(decode(name, params)?),
        method::FS_READ_DIRECTORY => read_directory(decode(name, params)?),
        method::FS_REMOVE => remove(decode(name, params)?),
        method::FS_COPY => copy(decode(name, params)?),
        method::FS_RENAME => rename(decode(name, params)?),
        method::FS_CANONICALIZE => canonicalize(decode(name, params)?),
        method::FS_WALK => walk(decode(name, params)?),
        _ => Err(Error::MethodNotFound(name.to_string())),
    }
}

/// `fs/open`'s file: a regular file only, opened without blocking.
pub fn open_for_reading(path: &Path) -> Result<File> {
    open_regular(path, true).map(|(file, _)| file)
}

/// Open streaming handles of one connection.
#[derive(Default)]
pub struct Handles {
    files: Mutex<HashMap<String, Arc<File>>>,
}

impl Handles {
    /// `fs/open`: `opener` opens the file (here, or in a sandboxed helper).
    /// The checks and their words are the reference's.
    pub fn open(&self, p: OpenParams, opener: impl FnOnce(&Path) -> Result<File>) -> Result<Value> {
        check_handle_id(&p.handle_id)?;
        // Checked before the open (no file opened for nothing) and again
        // after it (another open of this connection may have come first).
        let room = |files: &HashMap<String, Arc<File>>| {
            if files.contains_key(&p.handle_id) {
                return Err(Error::InvalidRequest(format!(
                    "file read handle `{}` already exists",
                    p.handle_id
                )));
            }
            if files.len() >= MAX_HANDLES {
                return Err(Error::InvalidRequest(format!(
                    "at most {MAX_HANDLES} file reads may be open per connection"
                )));
            }
            Ok(())
        };
        room(&lock(&self.files))?;
        let file = opener(&p.path.0)?;
        let mut files = lock(&self.files);
        room(&files)?;
        files.insert(p.handle_id.clone(), Arc::new(file));
        Ok(json!({ "handleId": p.handle_id }))
    }

    fn get(&self, id: &str) -> Result<Arc<File>> {
        lock(&self.files)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                message: format!("unknown file read handle `{id}`"),
                errno: None,
            })
    }

    /// `fs/readBlock`: up to `len` bytes (1 to 1 MiB) at `offset`; `eof`
    /// when fewer than `len` came back. A read that fails closes the
    /// handle.
    pub fn read_block(&self, p: ReadBlockParams) -> Result<(Vec<u8>, bool)> {
        check_handle_id(&p.handle_id)?;
        if !(1..=MAX_BLOCK).contains(&p.len) {
            return Err(Error::InvalidRequest(format!(
                "file read block length must be between 1 and {MAX_BLOCK}"
            )));
        }
        let file = self.get(&p.handle_id)?;
        let mut buf = vec![0u8; p.len];
        let mut filled = 0;
        while filled < p.len {
            let at = p.offset.saturating_add(filled as u64);
            match file.read_at(&mut buf[filled..], at) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    lock(&self.files).remove(&p.handle_id);
                    return Err(fs_error(
                        format!("failed to read file read handle `{}`", p.handle_id),
                        &err,
                    ));
                }
            }
        }
        buf.truncate(filled);
        Ok((buf, filled < p.len))
    }

    /// `fs/close`; closing a handle that is not open succeeds.
    pub fn close(&self, p: HandleParams) -> Result<Value> {
        check_handle_id(&p.handle_id)?;
        lock(&self.files).remove(&p.handle_id);
        Ok(json!({}))
    }
}

fn check_handle_id(id: &str) -> Result<()> {
    if id.len() > MAX_HANDLE_ID {
        return Err(Error::InvalidRequest(format!(
            "file read handle ID must not exceed {MAX_HANDLE_ID} bytes"
        )));
    }
    Ok(())
}
