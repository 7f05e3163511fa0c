//! Typed request parameters: the environment policy, the sandbox and the
//! walk options a caller gives. Each is built with methods, or read from
//! JSON (a configuration file) with `serde`, where a member the protocol
//! does not have is an error (`inherrit` is refused, not ignored).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Names of variables that look secret, which the default environment
/// policy ([`EnvPolicy::executor_default`]) and `exec-server run` leave
/// behind. The first three are the protocol's default excludes, which the
/// server applies itself; the rest are added to the policy's `exclude`.
/// `--help` and README list the same (a test keeps them so).
pub const SECRET_NAMES: &[&str] = &[
    "*TOKEN*",
    "*KEY*",
    "*SECRET*",
    "*PASSWORD*",
    "*PASSWD*",
    "*CREDENTIAL*",
];

/// Where a child's environment starts from (`envPolicy.inherit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inherit {
    /// Every variable of the server's environment.
    All,
    /// `PATH SHELL TMPDIR TEMP TMP HOME LANG LC_ALL LC_CTYPE LOGNAME USER`.
    Core,
    /// None.
    None,
}

/// An `envPolicy` (`docs/PROTOCOL.md` section 7): the child's environment
/// derived on the executor from the server's own. All five members are
/// always sent (the reference server requires them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvPolicy {
    /// Where to start.
    pub inherit: Inherit,
    /// Keep `*KEY*`, `*SECRET*` and `*TOKEN*`, which the server otherwise
    /// drops.
    #[serde(default)]
    pub ignore_default_excludes: bool,
    /// Names to drop (`*` and `?`, any case).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Variables to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// When not empty, keep only these names.
    #[serde(default)]
    pub include_only: Vec<String>,
}

impl EnvPolicy {
    /// Start from `inherit`, with the protocol's default excludes.
    pub fn inherit(inherit: Inherit) -> Self {
        EnvPolicy {
            inherit,
            ignore_default_excludes: false,
            exclude: Vec::new(),
            set: BTreeMap::new(),
            include_only: Vec::new(),
        }
    }

    /// What a started process gets unless told otherwise: the executor's
    /// environment without the names in [`SECRET_NAMES`], as `exec-server
    /// run` does.
    pub fn executor_default() -> Self {
        EnvPolicy::inherit(Inherit::All).exclude_all(SECRET_NAMES.iter().copied())
    }

    /// Drop names matching `pattern`.
    pub fn exclude(mut self, pattern: impl Into<String>) -> Self {
        self.exclude.push(pattern.into());
        self
    }

    /// Drop names matching any of `patterns`.
    pub fn exclude_all<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exclude.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Set a variable.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set.insert(key.into(), value.into());
        self
    }

    /// Keep only names matching `pattern` (and the other such patterns).
    pub fn include_only(mut self, pattern: impl Into<String>) -> Self {
        self.include_only.push(pattern.into());
        self
    }

    /// Keep the protocol's default excludes (`*KEY*`, `*SECRET*`,
    /// `*TOKEN*`) when `yes`.
    pub fn ignore_default_excludes(mut self, yes: bool) -> Self {
        self.ignore_default_excludes = yes;
        self
    }
}

/// `fs/walk` options (`docs/PROTOCOL.md` section 8). The defaults are
/// bounded: depth 64, 10,000 directories, 100,000 entries, directory links
/// not followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WalkOptions {
    /// How deep to go below the start.
    pub max_depth: u32,
    /// At most this many directories read.
    pub max_directories: u32,
    /// At most this many entries returned.
    pub max_entries: u32,
    /// Descend into links to directories.
    pub follow_directory_symlinks: bool,
    /// List directories whose name starts with `.` without entering them
    /// (sent only when true: a reference server older than the option
    /// would not know it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prune_hidden_directories: bool,
}

impl Default for WalkOptions {
    fn default() -> Self {
        use crate::protocol::{
            WALK_DEFAULT_MAX_DEPTH, WALK_DEFAULT_MAX_DIRECTORIES, WALK_DEFAULT_MAX_ENTRIES,
        };
        WalkOptions {
            max_depth: WALK_DEFAULT_MAX_DEPTH,
            max_directories: WALK_DEFAULT_MAX_DIRECTORIES,
            max_entries: WALK_DEFAULT_MAX_ENTRIES,
            follow_directory_symlinks: false,
            prune_hidden_directories: false,
        }
    }
}

impl WalkOptions {
    /// The defaults.
    pub fn new() -> Self {
        WalkOptions::default()
    }

    /// How deep to go.
    pub fn max_depth(mut self, n: u32) -> Self {
        self.max_depth = n;
        self
    }

    /// At most `n` directories.
    pub fn max_directories(mut self, n: u32) -> Self {
        self.max_directories = n;
        self
    }

    /// At most `n` entries.
    pub fn max_entries(mut self, n: u32) -> Self {
        self.max_entries = n;
        self
    }

    /// Descend into links to directories.
    pub fn follow_directory_symlinks(mut self, yes: bool) -> Self {
        self.follow_directory_symlinks = yes;
        self
    }

    /// List hidden directories (`.git`, `.cache`) without entering them.
    pub fn prune_hidden_directories(mut self, yes: bool) -> Self {
        self.prune_hidden_directories = yes;
        self
    }
}

/// A `FileSystemSandboxContext` (`docs/PROTOCOL.md` section 6): what a
/// command may touch, enforced by the executor's kernel. Build one from a
/// preset and add to it, or read one from JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sandbox {
    /// What is allowed.
    pub permissions: Permissions,
    /// The directory relative entries resolve against (default: the
    /// process's working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// What `:workspace_roots` (`project_roots`) binds to, as `file:`
    /// URIs; `None` leaves it to the executor (its own roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_roots: Option<Vec<String>>,
    /// Accepted for compatibility; meaningless on Linux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_sandbox_level: Option<String>,
    /// Accepted for compatibility; the executor uses its own sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_legacy_landlock: Option<bool>,
}

/// `ExecPermissionProfile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Permissions {
    /// No sandbox.
    Disabled,
    /// The caller sandboxes the command itself.
    External {
        /// The network.
        #[serde(default)]
        network: Network,
    },
    /// The executor sandboxes the command.
    Managed {
        /// The filesystem.
        file_system: FileSystem,
        /// The network.
        #[serde(default)]
        network: Network,
    },
}

/// Network access in a sandbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// None (Unix sockets only).
    #[default]
    Restricted,
    /// Open.
    Enabled,
}

/// Filesystem access in a managed sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileSystem {
    /// Everything.
    Unrestricted,
    /// Only what the entries grant.
    Restricted {
        /// The grants; the most specific path wins.
        #[serde(default)]
        entries: Vec<Entry>,
        /// How deep a glob entry is expanded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        glob_scan_max_depth: Option<usize>,
    },
}

/// One grant of a restricted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// What it applies to.
    pub path: EntryPath,
    /// `read`, `write` or `deny` (`none`).
    pub access: Access,
    /// `skip`: a path that does not exist is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_path_behavior: Option<MissingPath>,
}

/// What a missing path of an entry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPath {
    /// Leave it out.
    Skip,
}

/// The access an entry grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Read and write.
    Write,
    /// Read.
    Read,
    /// Nothing (also spelt `none`).
    #[serde(alias = "none")]
    Deny,
}

/// The path of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EntryPath {
    /// A path on the executor.
    Path {
        /// Absolute, or relative to the sandbox's `cwd`.
        path: String,
    },
    /// A place the executor names.
    Special {
        /// Which.
        value: Special,
    },
    /// Paths matching a glob.
    GlobPattern {
        /// The pattern.
        pattern: String,
    },
}

/// A place the executor names, optionally below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Special {
    /// Which place.
    pub kind: SpecialKind,
    /// A path below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subpath: Option<String>,
}

/// The places an executor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialKind {
    /// `/`.
    Root,
    /// What a program needs to run at all (`/dev/null`, ...).
    Minimal,
    /// The workspace roots (`:workspace_roots`).
    ProjectRoots,
    /// `$TMPDIR`.
    Tmpdir,
    /// `/tmp`.
    SlashTmp,
}

impl Sandbox {
    /// Read everything, write nothing, no network.
    pub fn read_only() -> Self {
        Sandbox::managed(vec![Entry::special(SpecialKind::Root, Access::Read)])
    }

    /// Read everything; write the workspace roots, `$TMPDIR` and `/tmp`;
    /// no network.
    pub fn workspace_write() -> Self {
        let mut tmpdir = Entry::special(SpecialKind::Tmpdir, Access::Write);
        tmpdir.missing_path_behavior = Some(MissingPath::Skip);
        Sandbox::managed(vec![
            Entry::special(SpecialKind::Root, Access::Read),
            Entry::special(SpecialKind::ProjectRoots, Access::Write),
            tmpdir,
            Entry::special(SpecialKind::SlashTmp, Access::Write),
        ])
    }

    /// A managed sandbox with exactly these entries.
    pub fn managed(entries: Vec<Entry>) -> Self {
        Sandbox {
            permissions: Permissions::Managed {
                file_system: FileSystem::Restricted {
                    entries,
                    glob_scan_max_depth: None,
                },
                network: Network::Restricted,
            },
            cwd: None,
            workspace_roots: None,
            windows_sandbox_level: None,
            use_legacy_landlock: None,
        }
    }

    /// Open (or close) the network.
    pub fn network(mut self, enabled: bool) -> Self {
        let to = if enabled {
            Network::Enabled
        } else {
            Network::Restricted
        };
        match &mut self.permissions {
            Permissions::Managed { network, .. } | Permissions::External { network } => {
                *network = to
            }
            Permissions::Disabled => {}
        }
        self
    }

    /// Bind `:workspace_roots` to these directories on the executor.
    pub fn workspace_roots<I, P>(mut self, roots: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        self.workspace_roots = Some(
            roots
                .into_iter()
                .map(|r| crate::protocol::path_to_uri(r.as_ref()))
                .collect(),
        );
        self
    }

    /// Add a grant for a path (a restricted managed sandbox only; others
    /// are left as they are).
    pub fn grant(mut self, path: impl Into<PathBuf>, access: Access) -> Self {
        if let Permissions::Managed {
            file_system: FileSystem::Restricted { entries, .. },
            ..
        } = &mut self.permissions
        {
            entries.push(Entry {
                path: EntryPath::Path {
                    path: path.into().to_string_lossy().into_owned(),
                },
                access,
                missing_path_behavior: None,
            });
        }
        self
    }
}

impl Entry {
    /// A grant on a place the executor names.
    pub fn special(kind: SpecialKind, access: Access) -> Self {
        Entry {
            path: EntryPath::Special {
                value: Special {
                    kind,
                    subpath: None,
                },
            },
            access,
            missing_path_behavior: None,
        }
    }
}
