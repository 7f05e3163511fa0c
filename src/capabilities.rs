//! `capabilityRoots/discoverV1`: one round trip that finds the skills,
//! plugin manifests and MCP/app configs under each capability root the
//! orchestrator names (REFERENCE-NOTES.md section 5.4), so that it need not
//! walk them with hundreds of fs calls. A root with a `sandbox` is scanned
//! inside that sandbox (the kernel decides every read, so a link into a
//! denied place is not followed); one broken root does not fail the call.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::protocol::{WirePath, path_to_uri};

/// Roots one call may name.
pub const MAX_ROOTS: usize = 128;
/// Largest file read.
const MAX_FILE: u64 = 1 << 20;
/// Bytes of files one root's answer may carry.
const MAX_BUNDLE: usize = 16 << 20;
/// The walk's bounds: depth, directories read, entries seen.
const MAX_DEPTH: usize = 6;
const MAX_DIRECTORIES: usize = 2_000;
const MAX_ENTRIES: usize = 20_000;

/// Where a plugin root keeps its manifest, in priority order.
const MANIFESTS: &[&str] = &[
    ".codex-plugin/plugin.json",
    ".claude-plugin/plugin.json",
    ".cursor-plugin/plugin.json",
];

/// The internal method a sandboxed helper runs: one root's scan.
pub const SCAN_ROOT: &str = "capabilityRoots/scanRoot";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoverParams {
    pub roots: Vec<Root>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    pub id: String,
    pub path: WirePath,
    #[serde(default)]
    pub sandbox: Option<Value>,
}

/// The call's own check: at most [`MAX_ROOTS`] roots.
pub fn check(params: &DiscoverParams) -> Result<()> {
    if params.roots.len() > MAX_ROOTS {
        return Err(Error::InvalidRequest(format!(
            "capability root discovery accepts at most {MAX_ROOTS} roots"
        )));
    }
    Ok(())
}

/// An answer for a root that could not be scanned at all.
pub fn failed(id: &str, path: &Path, error: String) -> Value {
    let mut found = Found::new(id, path);
    found.error = Some(error);
    found.into_value()
}

/// Scan one root, here (or, called by the sandboxed helper, inside its
/// sandbox). `params`: `{id, path}`.
pub fn scan_root(params: Value) -> Result<Value> {
    #[derive(Deserialize)]
    struct Params {
        id: String,
        path: WirePath,
    }
    let p: Params = crate::protocol::decode(SCAN_ROOT, params)?;
    Ok(scan(&p.id, &p.path.0))
}

struct Found {
    id: String,
    root: PathBuf,
    plugin: Option<Value>,
    skills: Vec<(String, Value)>,
    namespace_manifests: Vec<Value>,
    warnings: Vec<String>,
    error: Option<String>,
    /// Bytes of file contents carried so far.
    carried: usize,
}

impl Found {
    fn new(id: &str, root: &Path) -> Self {
        Found {
            id: id.to_string(),
            root: root.to_path_buf(),
            plugin: None,
            skills: Vec::new(),
            namespace_manifests: Vec::new(),
            warnings: Vec::new(),
            error: None,
            carried: 0,
        }
    }

    fn into_value(mut self) -> Value {
        self.skills.sort_by(|a, b| a.0.cmp(&b.0));
        json!({
            "id": self.id,
            "path": path_to_uri(&self.root),
            "plugin": self.plugin,
            "skills": self.skills.into_iter().map(|(_, s)| s).collect::<Vec<_>>(),
            "namespaceManifests": self.namespace_manifests,
            "warnings": self.warnings,
            "error": self.error,
        })
    }

    /// `{path, contents}` of a UTF-8 file within the bounds; else a
    /// warning and `None`. A missing file is `None` without one.
    fn text_file(&mut self, path: &Path) -> Option<Value> {
        let uri = path_to_uri(path);
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                let why = crate::error::os_text(&err);
                self.warnings.push(format!("failed to read {uri}: {why}"));
                return None;
            }
        };
        match file.metadata() {
            Ok(meta) if !meta.is_file() => {
                self.warnings
                    .push(format!("skipped {uri}: not a regular file"));
                return None;
            }
            Ok(meta) if meta.len() > MAX_FILE => {
                self.warnings
                    .push(format!("skipped {uri}: larger than {MAX_FILE} bytes"));
                return None;
            }
            Ok(_) => {}
            Err(err) => {
                let why = crate::error::os_text(&err);
                self.warnings.push(format!("failed to read {uri}: {why}"));
                return None;
            }
        }
        let mut bytes = Vec::new();
        if let Err(err) = file.take(MAX_FILE + 1).read_to_end(&mut bytes) {
            let why = crate::error::os_text(&err);
            self.warnings.push(format!("failed to read {uri}: {why}"));
            return None;
        }
        if bytes.len() as u64 > MAX_FILE {
            self.warnings
                .push(format!("skipped {uri}: larger than {MAX_FILE} bytes"));
            return None;
        }
        let Ok(contents) = String::from_utf8(bytes) else {
            self.warnings.push(format!("skipped {uri}: not UTF-8"));
            return None;
        };
        if self.carried + contents.len() > MAX_BUNDLE {
            self.warnings.push(format!(
                "skipped {uri}: the capability root's files passed {MAX_BUNDLE} bytes"
            ));
            return None;
        }
        self.carried += contents.len();
        Some(json!({"path": uri, "contents": contents}))
    }

    /// The manifest of the plugin rooted at `dir`, if it has one.
    fn manifest_of(&mut self, dir: &Path) -> Option<Value> {
        MANIFESTS
            .iter()
            .map(|m| dir.join(m))
            .find(|p| p.is_file())
            .and_then(|p| self.text_file(&p))
    }

    /// A file a manifest names (`mcpServers`, `apps`): `./`-relative, no
    /// `..`, under the root; else a warning.
    fn declared_file(&mut self, member: &str, value: &str) -> Option<Value> {
        let relative = Path::new(value);
        let ok =
            value.starts_with("./") && !relative.components().any(|c| c == Component::ParentDir);
        let path = self.root.join(relative);
        let under = ok
            && match (fs::canonicalize(&path), fs::canonicalize(&self.root)) {
                (Ok(real), Ok(root)) => real.starts_with(root),
                // Missing: nothing to read; the name itself was fine.
                (Err(_), _) => true,
                _ => false,
            };
        if !under {
            self.warnings.push(format!(
                "ignored the plugin manifest's {member} `{value}`: it must be a ./ path inside the plugin root"
            ));
            return None;
        }
        self.text_file(&path)
    }
}

/// Scan one root here.
pub fn scan(id: &str, root: &Path) -> Value {
    let mut found = Found::new(id, root);
    let uri = path_to_uri(root);
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            found.error = Some(format!("capability root {uri} is not a directory"));
            return found.into_value();
        }
        Err(err) => {
            let why = crate::error::os_text(&err);
            found.error = Some(format!("failed to stat capability root {uri}: {why}"));
            return found.into_value();
        }
    }
    // The root's own plugin, or the nearest ancestor's manifest for the
    // namespace of what is found below.
    match found.manifest_of(root) {
        Some(manifest) => {
            let declared: Value = manifest["contents"]
                .as_str()
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or(Value::Null);
            if declared.is_null() {
                found.warnings.push(format!(
                    "the plugin manifest {} is not JSON",
                    manifest["path"]
                ));
            }
            let mcp = match &declared["mcpServers"] {
                Value::String(file) => found.declared_file("mcpServers", file),
                // Inline servers: no file to read.
                Value::Object(_) => None,
                _ => found.text_file(&root.join(".mcp.json")),
            };
            let apps = match &declared["apps"] {
                Value::String(file) => found.declared_file("apps", file),
                _ => None,
            };
            found.namespace_manifests.push(manifest.clone());
            found.plugin =
                Some(json!({"manifest": manifest, "mcpConfig": mcp, "appsConfig": apps}));
        }
        None => {
            let inherited = root
                .ancestors()
                .skip(1)
                .find_map(|dir| MANIFESTS.iter().map(|m| dir.join(m)).find(|p| p.is_file()));
            if let Some(path) = inherited
                && let Some(manifest) = found.text_file(&path)
            {
                found.namespace_manifests.push(manifest);
            }
        }
    }
    walk(&mut found, root);
    found.into_value()
}

/// Breadth first, links to directories followed (each directory once),
/// hidden directories too, within the bounds.
fn walk(found: &mut Found, root: &Path) {
    let mut seen = HashSet::new();
    if let Ok(meta) = fs::metadata(root) {
        seen.insert((meta.dev(), meta.ino()));
    }
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    let (mut directories, mut entries, mut cut) = (0, 0, false);
    while let Some((dir, depth)) = queue.pop_front() {
        if directories == MAX_DIRECTORIES {
            cut = true;
            break;
        }
        directories += 1;
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(err) => {
                let why = crate::error::os_text(&err);
                found.warnings.push(format!(
                    "failed to read directory {}: {why}",
                    path_to_uri(&dir)
                ));
                continue;
            }
        };
        if dir != root
            && let Some(manifest) = found.manifest_of(&dir)
        {
            found.namespace_manifests.push(manifest);
        }
        let mut children: Vec<_> = listing.filter_map(|e| e.ok()).collect();
        children.sort_by_key(|e| e.file_name());
        for child in children {
            if entries == MAX_ENTRIES {
                cut = true;
                break;
            }
            entries += 1;
            let path = child.path();
            // Links count as their targets; a dangling one is nothing.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    cut = true;
                } else if seen.insert((meta.dev(), meta.ino())) {
                    queue.push_back((path, depth + 1));
                }
            } else if meta.is_file() && child.file_name() == "SKILL.md" {
                if let Some(instructions) = found.text_file(&path) {
                    let metadata = found.text_file(&dir.join("agents/openai.yaml"));
                    let key = instructions["path"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    found.skills.push((
                        key,
                        json!({"instructions": instructions, "metadata": metadata}),
                    ));
                }
            }
        }
    }
    if cut {
        found.warnings.push(format!(
            "capability scan reached its traversal limit (root: {})",
            path_to_uri(root)
        ));
    }
}
