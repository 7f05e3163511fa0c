//! The sandbox intent as `docs/PROTOCOL.md` section 6 writes it, and its binding
//! to this executor's own paths.
//!
//! Parsing keeps the wire shapes (tagged enums, snake_case inner fields);
//! [`resolve`] turns them into [`Rules`]: canonical paths with one access
//! each, `project_roots` bound to the executor's workspace roots, globs
//! expanded, and `.git` kept read-only inside writable roots.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::protocol::{WirePath, parse_path};

/// `FileSystemSandboxContext`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Context {
    pub permissions: Permissions,
    #[serde(default)]
    pub cwd: Option<WirePath>,
    #[serde(default)]
    pub workspace_roots: Option<Vec<WirePath>>,
    /// Accepted for compatibility; meaningless on Linux.
    #[serde(default)]
    #[allow(dead_code)]
    pub windows_sandbox_level: Option<Value>,
    /// Accepted for compatibility; the server always uses its own sandbox.
    #[serde(default)]
    #[allow(dead_code)]
    pub use_legacy_landlock: Option<bool>,
}

/// `ExecPermissionProfile`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Permissions {
    Disabled,
    External {
        #[serde(default)]
        #[allow(dead_code)]
        network: Network,
    },
    Managed {
        file_system: FileSystem,
        #[serde(default)]
        network: Network,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    #[default]
    Restricted,
    Enabled,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileSystem {
    Unrestricted,
    Restricted {
        #[serde(default)]
        entries: Vec<Entry>,
        #[serde(default)]
        glob_scan_max_depth: Option<usize>,
    },
}

#[derive(Debug, Deserialize)]
pub struct Entry {
    pub path: EntryPath,
    pub access: Access,
    /// `"skip"` is the only value; a missing path is skipped either way.
    #[serde(default)]
    #[allow(dead_code)]
    pub missing_path_behavior: Option<MissingPath>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPath {
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Write,
    Read,
    #[serde(alias = "none")]
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryPath {
    Path { path: String },
    Special { value: Special },
    GlobPattern { pattern: String },
}

#[derive(Debug, Deserialize)]
pub struct Special {
    pub kind: SpecialKind,
    #[serde(default)]
    pub subpath: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialKind {
    Root,
    Minimal,
    #[serde(alias = "current_working_directory")]
    ProjectRoots,
    Tmpdir,
    SlashTmp,
}

/// What a resolved path may be used for. `Device` is the read-write access
/// `minimal` gives to `/dev/null` and friends (including ioctls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Grant {
    Write,
    Device,
    Read,
    Deny,
}

/// A policy bound to this executor: `None` filesystem rules mean the
/// filesystem is unrestricted.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rules {
    pub fs: Option<BTreeMap<PathBuf, Grant>>,
    pub network_restricted: bool,
    /// The server's own endpoints (sockets, the persist directory),
    /// masked in the child whatever the policy says.
    #[serde(default)]
    pub hidden: Vec<PathBuf>,
}

/// Parse a `sandbox` value; `Ok(None)` when it asks for no sandbox.
pub fn parse(sandbox: Option<&Value>) -> Result<Option<Context>> {
    let Some(value) = sandbox.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let context: Context = serde_json::from_value(value.clone())
        .map_err(|err| Error::InvalidParams(format!("invalid sandbox: {err}")))?;
    Ok(Some(context))
}

/// What `minimal` reads: enough to run a shell, coreutils, git, python.
const MINIMAL_READ: &[&str] = &[
    "/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/sys",
];
/// Device nodes every restricted policy may read and write (`minimal` or not).
const MINIMAL_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];
/// How deep a glob pattern is expanded when the policy does not say.
const DEFAULT_GLOB_DEPTH: usize = 8;
/// The most paths one glob may expand to.
const MAX_GLOB_MATCHES: usize = 4096;

/// Bind a parsed context on this executor. `start_cwd` is the process's
/// cwd (the default policy cwd); `server_roots` are the server's own
/// workspace roots. `Ok(None)`: nothing to enforce.
pub fn resolve(
    context: &Context,
    start_cwd: Option<&Path>,
    server_roots: &[PathBuf],
) -> Result<Option<Rules>> {
    let (file_system, network) = match &context.permissions {
        Permissions::Disabled | Permissions::External { .. } => return Ok(None),
        Permissions::Managed {
            file_system,
            network,
        } => (file_system, *network),
    };
    let network_restricted = network == Network::Restricted;
    let (entries, glob_depth) = match file_system {
        FileSystem::Unrestricted if !network_restricted => return Ok(None),
        FileSystem::Unrestricted => {
            return Ok(Some(Rules {
                fs: None,
                network_restricted,
                hidden: Vec::new(),
            }));
        }
        FileSystem::Restricted {
            entries,
            glob_scan_max_depth,
        } => (entries, glob_scan_max_depth.unwrap_or(DEFAULT_GLOB_DEPTH)),
    };
    let roots: Vec<PathBuf> = match &context.workspace_roots {
        Some(list) => list.iter().map(|p| p.0.clone()).collect(),
        None => server_roots.to_vec(),
    };
    let cwd = context
        .cwd
        .as_ref()
        .map(|p| p.0.clone())
        .or_else(|| start_cwd.map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));

    let mut paths: Vec<(PathBuf, Grant)> = Vec::new();
    for entry in entries {
        let grant = match entry.access {
            Access::Write => Grant::Write,
            Access::Read => Grant::Read,
            Access::Deny => Grant::Deny,
        };
        match &entry.path {
            EntryPath::Path { path } => {
                if let Some(sub) = workspace_shorthand(path) {
                    for root in &roots {
                        paths.push((join_subpath(root, sub)?, grant));
                    }
                } else {
                    paths.push((absolute(path, &cwd)?, grant));
                }
            }
            EntryPath::Special { value } => {
                let sub = value.subpath.as_deref();
                match value.kind {
                    SpecialKind::Root => paths.push((join_subpath(Path::new("/"), sub)?, grant)),
                    SpecialKind::Minimal => {
                        for p in MINIMAL_READ {
                            paths.push((PathBuf::from(p), grant.max(Grant::Read)));
                        }
                        if grant == Grant::Deny {
                            for p in MINIMAL_DEVICES {
                                paths.push((PathBuf::from(p), Grant::Deny));
                            }
                        }
                        // Name resolution often reads through a link out of /etc.
                        if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf") {
                            paths.push((resolv, grant.max(Grant::Read)));
                        }
                    }
                    SpecialKind::ProjectRoots => {
                        for root in &roots {
                            paths.push((join_subpath(root, sub)?, grant));
                        }
                    }
                    SpecialKind::Tmpdir => {
                        if let Some(tmp) = std::env::var_os("TMPDIR").filter(|t| !t.is_empty()) {
                            paths.push((join_subpath(Path::new(&tmp), sub)?, grant));
                        }
                    }
                    SpecialKind::SlashTmp => {
                        paths.push((join_subpath(Path::new("/tmp"), sub)?, grant))
                    }
                }
            }
            EntryPath::GlobPattern { pattern } => {
                let pattern = if let Some(sub) = workspace_shorthand(pattern) {
                    // Expand once per root.
                    for root in &roots {
                        let full = root.join(sub.unwrap_or(""));
                        for p in expand_glob(&full.to_string_lossy(), glob_depth)? {
                            paths.push((p, grant));
                        }
                    }
                    continue;
                } else if pattern.starts_with('/') {
                    pattern.clone()
                } else {
                    cwd.join(pattern).to_string_lossy().into_owned()
                };
                for p in expand_glob(&pattern, glob_depth)? {
                    paths.push((p, grant));
                }
            }
        }
    }

    // Canonical paths (the kernel sees those); a missing path is skipped.
    // When one path is named twice, the stricter access wins.
    let mut fs: BTreeMap<PathBuf, Grant> = BTreeMap::new();
    for (path, grant) in paths {
        let Ok(real) = std::fs::canonicalize(&path) else {
            continue;
        };
        let slot = fs.entry(real).or_insert(grant);
        *slot = (*slot).max(grant);
    }
    // Device nodes every process expects (`/dev/null` and friends) stay
    // usable under any restricted policy, unless an entry denies them.
    for dev in MINIMAL_DEVICES {
        let Ok(real) = std::fs::canonicalize(dev) else {
            continue;
        };
        let denied_above = real
            .ancestors()
            .skip(1)
            .find_map(|a| fs.get(a))
            .is_some_and(|g| *g == Grant::Deny);
        if !denied_above {
            fs.entry(real).or_insert(Grant::Device);
        }
    }
    // `.git` (a directory or a worktree's file) stays read-only inside a
    // writable root unless an entry names it.
    let writable: Vec<PathBuf> = fs
        .iter()
        .filter(|(_, g)| **g == Grant::Write)
        .map(|(p, _)| p.clone())
        .collect();
    for root in writable {
        let git = root.join(".git");
        if git.symlink_metadata().is_ok() && !fs.contains_key(&git) {
            fs.insert(git, Grant::Read);
        }
    }
    Ok(Some(Rules {
        fs: Some(fs),
        network_restricted,
        hidden: Vec::new(),
    }))
}

/// `:workspace_roots` or `:workspace_roots/sub` -> `Some(None)` or
/// `Some(Some("sub"))`.
fn workspace_shorthand(path: &str) -> Option<Option<&str>> {
    let rest = path.strip_prefix(":workspace_roots")?;
    if rest.is_empty() {
        return Some(None);
    }
    let sub = rest.strip_prefix('/')?;
    Some((!sub.is_empty()).then_some(sub))
}

fn join_subpath(base: &Path, sub: Option<&str>) -> Result<PathBuf> {
    let Some(sub) = sub.filter(|s| !s.is_empty()) else {
        return Ok(base.to_path_buf());
    };
    let sub = Path::new(sub);
    if sub.is_absolute() {
        return Err(Error::InvalidParams(format!(
            "sandbox subpath must be relative, got {}",
            sub.display()
        )));
    }
    Ok(base.join(sub))
}

fn absolute(path: &str, cwd: &Path) -> Result<PathBuf> {
    if path.starts_with('/') || path.starts_with("file://") {
        parse_path(path)
    } else {
        Ok(cwd.join(path))
    }
}

/// Expand a glob (`*`, `?` within a component, `**` for any number of
/// components) into the existing paths it matches, looking at most
/// `max_depth` directories below its literal prefix.
fn expand_glob(pattern: &str, max_depth: usize) -> Result<Vec<PathBuf>> {
    let mut base = PathBuf::from("/");
    let mut parts: Vec<String> = Vec::new();
    for component in Path::new(pattern).components() {
        match component {
            Component::RootDir => {}
            Component::Normal(c) => {
                let c = c.to_string_lossy().into_owned();
                if parts.is_empty() && !c.contains(['*', '?']) {
                    base.push(&c);
                } else {
                    parts.push(c);
                }
            }
            _ => {
                return Err(Error::InvalidParams(format!(
                    "sandbox glob pattern must be a plain path: {pattern}"
                )));
            }
        }
    }
    let mut found = Vec::new();
    if parts.is_empty() {
        found.push(base);
        return Ok(found);
    }
    glob_walk(&base, &parts, max_depth, &mut found);
    Ok(found)
}

fn glob_walk(dir: &Path, parts: &[String], depth_left: usize, found: &mut Vec<PathBuf>) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    if found.len() >= MAX_GLOB_MATCHES {
        return;
    }
    if first == "**" {
        // Zero components...
        if rest.is_empty() {
            found.push(dir.to_path_buf());
        } else {
            glob_walk(dir, rest, depth_left, found);
        }
        // ...or one more, keeping `**`.
        if depth_left == 0 {
            return;
        }
        for child in subdirs(dir) {
            glob_walk(&child, parts, depth_left - 1, found);
        }
        return;
    }
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        let name = entry.file_name();
        if !wildcard(first.as_bytes(), name.as_encoded_bytes()) {
            continue;
        }
        let path = entry.path();
        if rest.is_empty() {
            found.push(path);
        } else if depth_left > 0 && entry.file_type().is_ok_and(|t| t.is_dir()) {
            glob_walk(&path, rest, depth_left - 1, found);
        }
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    read.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Match one path component against `*` and `?`.
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    crate::wildcard::wildcard(pattern, name, b'*', b'?')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(value: Value, roots: &[PathBuf]) -> Result<Option<Rules>> {
        let context = parse(Some(&value))?.expect("a sandbox");
        resolve(&context, Some(Path::new("/")), roots)
    }

    fn restricted(entries: Value) -> Value {
        json!({"permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "restricted", "entries": entries}}})
    }

    #[test]
    fn wildcards_match_within_a_component() {
        assert!(wildcard(b"*.env", b"prod.env"));
        assert!(wildcard(b"a?c", b"abc"));
        assert!(!wildcard(b"*.env", b"env"));
        assert!(wildcard(b"*", b""));
        assert!(!wildcard(b"a*b", b"acbx"));
    }

    #[test]
    fn unknown_kinds_are_named() {
        let err = rules(json!({"permissions": {"type": "jail"}}), &[]).unwrap_err();
        assert!(err.to_string().contains("jail"), "{err}");
        let err = rules(
            restricted(
                json!([{"path": {"type": "special", "value": {"kind": "home"}},
                "access": "read"}]),
            ),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("home"), "{err}");
    }

    #[test]
    fn project_roots_bind_to_each_root_and_none_is_deny() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join(".git")).unwrap();
        let roots = [a.path().to_path_buf(), b.path().to_path_buf()];
        let r = rules(
            restricted(json!([
                {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"},
                {"path": {"type": "path", "path": ":workspace_roots/.git/hooks"}, "access": "none"},
            ])),
            &roots,
        )
        .unwrap()
        .unwrap();
        let fs = r.fs.unwrap();
        let a = a.path().canonicalize().unwrap();
        let b = b.path().canonicalize().unwrap();
        assert_eq!(fs.get(&a), Some(&Grant::Write));
        assert_eq!(fs.get(&b), Some(&Grant::Write));
        assert_eq!(fs.get(&a.join(".git")), Some(&Grant::Read));
        assert!(r.network_restricted);
    }

    #[test]
    fn an_empty_workspace_roots_list_drops_those_entries() {
        let a = tempfile::tempdir().unwrap();
        let mut value = restricted(json!([
            {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"},
        ]));
        value["workspaceRoots"] = json!([]);
        let r = rules(value, &[a.path().to_path_buf()]).unwrap().unwrap();
        assert!(r.fs.unwrap().values().all(|g| *g == Grant::Device));
    }

    #[test]
    fn globs_expand_to_existing_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("x/y")).unwrap();
        std::fs::write(d.path().join("x/y/a.env"), "").unwrap();
        std::fs::write(d.path().join("b.env"), "").unwrap();
        std::fs::write(d.path().join("c.txt"), "").unwrap();
        let mut found = expand_glob(&format!("{}/**/*.env", d.path().display()), 8).unwrap();
        found.sort();
        assert_eq!(
            found,
            vec![d.path().join("b.env"), d.path().join("x/y/a.env")]
        );
    }

    #[test]
    fn disabled_and_external_need_nothing() {
        assert!(
            rules(json!({"permissions": {"type": "disabled"}}), &[])
                .unwrap()
                .is_none()
        );
        assert!(
            rules(
                json!({"permissions": {"type": "external", "network": "restricted"}}),
                &[]
            )
            .unwrap()
            .is_none()
        );
        let open = json!({"permissions": {"type": "managed", "network": "enabled",
            "file_system": {"type": "unrestricted"}}});
        assert!(rules(open, &[]).unwrap().is_none());
    }
}
