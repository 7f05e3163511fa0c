//! `environmentConfig/read`: selected keys of the executor's own Codex
//! configuration layers (REFERENCE-NOTES.md section 5.3), so that an
//! orchestrator elsewhere can read what this host configures without a
//! config object of its own.
//!
//! The layers, lowest precedence first (what the notes describe, with the
//! file locations Codex uses on Unix):
//!
//! - config: `/etc/codex/config.toml` (system; cloud layers go right after
//!   it), `$CODEX_HOME/config.toml` (user), then the `.codex/config.toml`
//!   of each directory from the project root down to `cwd` when the
//!   project is trusted (`[projects."<root>"] trust_level = "trusted"` in
//!   the system or user layer; the root is the nearest ancestor of `cwd`
//!   holding one of `project_root_markers`, `.git` by default, else `cwd`
//!   itself), then `/etc/codex/managed_config.toml` (legacy managed);
//! - requirements: `/etc/codex/requirements.toml`.
//!
//! Each layer is cut down to the requested key paths (a layer left with
//! nothing is dropped) and written back as TOML. `EXEC_SERVER_CODEX_SYSTEM_DIR`
//! moves `/etc/codex` (for tests and unusual hosts).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::protocol::{parse_path, path_to_uri};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    pub cwd: String,
    #[serde(default)]
    pub config_paths: Vec<Vec<String>>,
    #[serde(default)]
    pub requirements_paths: Vec<Vec<String>>,
}

/// One file's layer before projection.
struct Layer {
    source: String,
    base_dir: PathBuf,
    table: toml::Table,
}

fn load_failed(why: impl std::fmt::Display) -> Error {
    Error::Internal {
        message: format!("failed to load executor-local config: {why}"),
        errno: None,
    }
}

/// A config file as a layer; a missing file is no layer.
fn load(path: &Path, source: &str) -> Result<Option<Layer>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(load_failed(format!(
                "{}: {}",
                path.display(),
                crate::error::os_text(&err)
            )));
        }
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        load_failed(format!("{}: {}", path.display(), e.message()))
    })?;
    Ok(Some(Layer {
        source: format!("{source}:{}", path.display()),
        base_dir: path.parent().unwrap_or(Path::new("/")).to_path_buf(),
        table,
    }))
}

fn system_dir() -> PathBuf {
    std::env::var_os("EXEC_SERVER_CODEX_SYSTEM_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/codex"))
}

fn codex_home(home: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CODEX_HOME").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return std::fs::canonicalize(&dir).or(Ok(dir));
    }
    match home {
        Some(home) => Ok(home.join(".codex")),
        None => Err(Error::Internal {
            message: "failed to find Codex home: neither CODEX_HOME nor HOME is set".into(),
            errno: None,
        }),
    }
}

/// `environmentConfig/read`.
pub fn read(params: Value) -> Result<Value> {
    let p: Params = crate::protocol::decode("environmentConfig/read", params)?;
    if p.config_paths.is_empty() && p.requirements_paths.is_empty() {
        return Err(Error::InvalidParams(
            "at least one config or requirements path is required".into(),
        ));
    }
    if p.config_paths
        .iter()
        .chain(&p.requirements_paths)
        .any(Vec::is_empty)
    {
        return Err(Error::InvalidParams(
            "TOML paths must contain at least one key segment".into(),
        ));
    }
    let cwd = parse_path(&p.cwd).map_err(|e| Error::InvalidParams(e.to_string()))?;
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let codex_home = codex_home(home.as_deref())?;
    let system = system_dir();

    let mut config = Vec::new();
    config.extend(load(&system.join("config.toml"), "system")?);
    let cloud_at = config.len();
    config.extend(load(&codex_home.join("config.toml"), "user")?);
    config.extend(project_layers(&cwd, &config)?);
    config.extend(load(&system.join("managed_config.toml"), "legacy managed")?);
    let requirements: Vec<Layer> = load(&system.join("requirements.toml"), "system")?
        .into_iter()
        .collect();

    Ok(json!({
        "userHomeDir": home.as_deref().map(path_to_uri),
        "codexHomeDir": path_to_uri(&codex_home),
        "hostname": hostname(),
        "config": project(config, cloud_at, &p.config_paths),
        "requirements": project(requirements, 0, &p.requirements_paths),
    }))
}

/// The trusted project's `.codex/config.toml` layers, root first.
fn project_layers(cwd: &Path, below: &[Layer]) -> Result<Vec<Layer>> {
    // Markers and trust come from the layers read so far, the higher one
    // winning.
    let lookup = |key: &str| below.iter().rev().find_map(|l| l.table.get(key));
    let markers: Vec<String> = match lookup("project_root_markers") {
        Some(toml::Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => vec![".git".into()],
    };
    let root = cwd
        .ancestors()
        .find(|dir| markers.iter().any(|m| dir.join(m).exists()))
        .unwrap_or(cwd)
        .to_path_buf();
    let trusted = below.iter().rev().find_map(|l| {
        let projects = l.table.get("projects")?.as_table()?;
        let entry = projects.get(root.to_str()?)?.as_table()?;
        entry.get("trust_level")?.as_str().map(|t| t == "trusted")
    });
    if trusted != Some(true) {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<&Path> = cwd
        .ancestors()
        .take_while(|d| d.starts_with(&root))
        .collect();
    dirs.reverse();
    let mut layers = Vec::new();
    for dir in dirs {
        layers.extend(load(&dir.join(".codex/config.toml"), "project")?);
    }
    Ok(layers)
}

/// Each layer cut down to `paths`; empty ones dropped; the cloud index
/// counts the kept layers below it.
fn project(layers: Vec<Layer>, cloud_at: usize, paths: &[Vec<String>]) -> Value {
    let mut kept = Vec::new();
    let mut insertion = 0;
    for (index, layer) in layers.into_iter().enumerate() {
        let mut selected = toml::Table::new();
        for path in paths {
            if let Some(value) = lookup(&layer.table, path) {
                insert(&mut selected, path, value.clone());
            }
        }
        if selected.is_empty() {
            continue;
        }
        if index < cloud_at {
            insertion += 1;
        }
        kept.push(json!({
            "source": layer.source,
            "baseDir": path_to_uri(&layer.base_dir),
            "toml": toml::to_string(&selected).unwrap_or_default(),
        }));
    }
    json!({"layers": kept, "cloudInsertionIndex": insertion})
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get(key)?.as_table()?;
    }
    table.get(last)
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = table;
    for key in parents {
        let next = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(next) = next else {
            return;
        };
        table = next;
    }
    table.insert(last.clone(), value);
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-ends
    // what fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}
