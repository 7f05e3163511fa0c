//! Per-process limits: what a `process/start` asks for (`limits`), the
//! server's defaults and ceilings (`--default-limits`, `--max-limits`),
//! what this host can enforce, and the cgroup files that enforce them.
//!
//! Memory, CPU and process count need a cgroup controller: cgroup v2's
//! (`memory.max` with `memory.swap.max` 0, `cpu.max`, `pids.max`) when the
//! server's subtree has it, else a cgroup v1 hierarchy of that controller
//! (a hybrid host) where the server may make a group. Without one, such a
//! limit is refused up front unless the request says `bestEffort`.
//! `RLIMIT_AS` and `RLIMIT_NPROC` are not used in its place: the first
//! bounds each process's address space (not what the tree uses), the
//! second every process of the user on the host (not the tree's).
//! The deadline and the output budget are the server's own and hold on
//! every host.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use crate::limits::{OutputAction, Requested};

/// The limits that need a cgroup controller, by wire name.
const CONTROLLED: [(&str, Controller); 3] = [
    ("memoryBytes", Controller::Memory),
    ("cpuPercent", Controller::Cpu),
    ("pids", Controller::Pids),
];

/// A cgroup controller a limit needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
}

impl Controller {
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// Where a controller's files are for this server's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In each process's cgroup v2 directory.
    Unified,
    /// In a cgroup v1 hierarchy: the server's own group there (processes
    /// get a group each below it).
    Legacy(PathBuf),
}

/// The controllers this server can use, found once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controllers {
    pub memory: Option<Place>,
    pub cpu: Option<Place>,
    pub pids: Option<Place>,
}

impl Controllers {
    pub fn get(&self, controller: Controller) -> Option<&Place> {
        match controller {
            Controller::Memory => self.memory.as_ref(),
            Controller::Cpu => self.cpu.as_ref(),
            Controller::Pids => self.pids.as_ref(),
        }
    }

    /// The wire names of the limits this host enforces.
    pub fn enforced(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = CONTROLLED
            .iter()
            .filter(|(_, c)| self.get(*c).is_some())
            .map(|(n, _)| *n)
            .collect();
        names.extend(["timeoutMs", "outputBytes"]);
        names
    }

    /// What a sandboxed process gets: the same, and `pids` where the
    /// sandbox has a user namespace of its own (`RLIMIT_NPROC` there).
    pub fn enforced_sandboxed(&self, user_namespace: bool) -> Vec<&'static str> {
        let mut names = self.enforced();
        if user_namespace && self.pids.is_none() {
            names.push("pids");
        }
        names
    }

    /// The v1 groups made at start, to remove at the end.
    pub fn legacy_roots(&self) -> Vec<PathBuf> {
        [&self.memory, &self.cpu, &self.pids]
            .into_iter()
            .filter_map(|p| match p {
                Some(Place::Legacy(root)) => Some(root.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The server's defaults and ceilings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// What a process that asks for nothing gets.
    pub defaults: Requested,
    /// The most a process may ask for.
    pub max: Requested,
}

/// The limits one process runs with, once checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effective {
    pub memory_bytes: Option<u64>,
    pub cpu_percent: Option<f64>,
    pub pids: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub output_bytes: Option<u64>,
    pub output_action: OutputAction,
    /// Asked for (or defaulted) and dropped under `bestEffort`.
    pub not_enforced: Vec<&'static str>,
    /// `pids` is enforced with `RLIMIT_NPROC` in the sandbox's user
    /// namespace, not with a cgroup.
    pub pids_by_rlimit: bool,
}

impl Effective {
    /// The limits as the wire names them (the audit log's form).
    pub fn describe(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let mut put = |k: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                out.insert(k.into(), v);
            }
        };
        put("memoryBytes", self.memory_bytes.map(Into::into));
        put("cpuPercent", self.cpu_percent.map(Into::into));
        put("pids", self.pids.map(Into::into));
        put("timeoutMs", self.timeout_ms.map(Into::into));
        put("outputBytes", self.output_bytes.map(Into::into));
        if self.output_bytes.is_some() && self.output_action == OutputAction::Block {
            put("outputLimitAction", Some("block".into()));
        }
        serde_json::Value::Object(out)
    }
}

impl Policy {
    /// Why this policy can't hold on a host with `host`'s controllers: a
    /// default or ceiling of a limit the host can't enforce (every start
    /// would be refused, or run past the operator's cap).
    pub fn check(
        &self,
        host: &Controllers,
        user_namespace: bool,
    ) -> std::result::Result<(), String> {
        for (flag, r) in [
            ("--default-limits", &self.defaults),
            ("--max-limits", &self.max),
        ] {
            for (name, controller, set) in [
                ("memory", Controller::Memory, r.memory_bytes.is_some()),
                ("cpus", Controller::Cpu, r.cpu_percent.is_some()),
                ("pids", Controller::Pids, r.pids.is_some()),
            ] {
                let sandboxed_only = controller == Controller::Pids && user_namespace;
                if set && host.get(controller).is_none() && !sandboxed_only {
                    return Err(format!(
                        "{flag} {name}: this host can't enforce it (the server has no cgroup {} \
                         controller of its own; exec-server sandbox-check says how processes are \
                         contained here)",
                        controller.name()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The limits a request runs with: its own, else the server's default,
    /// else the server's ceiling; refused if above the ceiling, malformed,
    /// or not enforceable here (unless `bestEffort`).
    /// `user_namespace`: the process runs in a sandbox with a user
    /// namespace of its own, where `RLIMIT_NPROC` counts its tree alone.
    pub fn apply(
        &self,
        asked: Option<&Requested>,
        host: &Controllers,
        user_namespace: bool,
    ) -> Result<Effective> {
        let none = Requested::default();
        let asked = asked.unwrap_or(&none);
        let d = &self.defaults;
        let m = &self.max;
        let mut e = Effective {
            memory_bytes: pick(
                asked.memory_bytes,
                d.memory_bytes,
                m.memory_bytes,
                "memoryBytes",
            )?,
            cpu_percent: pick_f(asked.cpu_percent, d.cpu_percent, m.cpu_percent)?,
            pids: pick(asked.pids, d.pids, m.pids, "pids")?,
            timeout_ms: pick(asked.timeout_ms, d.timeout_ms, m.timeout_ms, "timeoutMs")?,
            output_bytes: pick(
                asked.output_bytes,
                d.output_bytes,
                m.output_bytes,
                "outputBytes",
            )?,
            output_action: asked
                .output_limit_action
                .or(d.output_limit_action)
                .unwrap_or_default(),
            not_enforced: Vec::new(),
            pids_by_rlimit: false,
        };
        if let Some(memory) = e.memory_bytes {
            if memory < 1024 * 1024 {
                return Err(invalid(format!(
                    "limits.memoryBytes must be at least 1048576 (1 MiB), got {memory}"
                )));
            }
        }
        for (name, controller) in CONTROLLED {
            let set = match controller {
                Controller::Memory => e.memory_bytes.is_some(),
                Controller::Cpu => e.cpu_percent.is_some(),
                Controller::Pids => e.pids.is_some(),
            };
            if !set || host.get(controller).is_some() {
                continue;
            }
            if controller == Controller::Pids && user_namespace {
                // In its own user namespace, the tree's processes are all
                // that RLIMIT_NPROC counts: it means what pids.max does.
                e.pids_by_rlimit = true;
                continue;
            }
            if !asked.best_effort {
                let sandboxed = if controller == Controller::Pids {
                    " (a sandboxed process gets it where the sandbox has a user namespace)"
                } else {
                    ""
                };
                return Err(invalid(format!(
                    "limits.{name} cannot be enforced on this host: the server has no cgroup {} \
                     controller of its own{sandboxed} (environment/info lists what it \
                     enforces); send bestEffort: true to run without it",
                    controller.name()
                )));
            }
            match controller {
                Controller::Memory => e.memory_bytes = None,
                Controller::Cpu => e.cpu_percent = None,
                Controller::Pids => e.pids = None,
            }
            e.not_enforced.push(name);
        }
        Ok(e)
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidParams(message)
}

/// One integer limit: asked, else default, else ceiling; 0 and values
/// above the ceiling are refused.
fn pick(
    asked: Option<u64>,
    default: Option<u64>,
    max: Option<u64>,
    name: &str,
) -> Result<Option<u64>> {
    let value = asked.or(default).or(max);
    if let Some(v) = value {
        if v == 0 {
            return Err(invalid(format!("limits.{name} must be at least 1")));
        }
        if let Some(max) = max.filter(|&max| v > max) {
            return Err(invalid(format!(
                "limits.{name} {v} is above this server's maximum {max} (--max-limits)"
            )));
        }
    }
    Ok(value)
}

fn pick_f(asked: Option<f64>, default: Option<f64>, max: Option<f64>) -> Result<Option<f64>> {
    let value = asked.or(default).or(max);
    if let Some(v) = value {
        if !v.is_finite() || !(1.0..=100_000.0).contains(&v) {
            return Err(invalid(format!(
                "limits.cpuPercent must be from 1 to 100000 (percent of one core), got {v}"
            )));
        }
        if let Some(max) = max.filter(|&max| v > max) {
            return Err(invalid(format!(
                "limits.cpuPercent {v} is above this server's maximum {max} (--max-limits)"
            )));
        }
    }
    Ok(value)
}

// ---- the cgroup files ----

/// The period `cpu.max` and `cpu.cfs_period_us` use, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Write `limits` into the cgroup files of one process: `dir` is its v2
/// directory (for [`Place::Unified`]); `legacy` gets the v1 directory made
/// for each controller that lives there.
pub fn write_controls(
    limits: &Effective,
    host: &Controllers,
    unified: Option<&Path>,
    legacy: &mut Vec<(Controller, PathBuf)>,
    name: &str,
) -> std::io::Result<()> {
    let dir_for = |controller: Controller,
                   legacy: &mut Vec<(Controller, PathBuf)>|
     -> std::io::Result<(PathBuf, bool)> {
        match host.get(controller) {
            Some(Place::Unified) => unified
                .map(|d| (d.to_path_buf(), true))
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT)),
            Some(Place::Legacy(root)) => {
                let dir = root.join(name);
                std::fs::create_dir(&dir)?;
                legacy.push((controller, dir.clone()));
                Ok((dir, false))
            }
            None => Err(std::io::Error::from_raw_os_error(libc::ENOTSUP)),
        }
    };
    if let Some(bytes) = limits.memory_bytes {
        let (dir, v2) = dir_for(Controller::Memory, legacy)?;
        if v2 {
            std::fs::write(dir.join("memory.max"), bytes.to_string())?;
            // No swap to spill into; absent without swap accounting.
            write_if_present(&dir.join("memory.swap.max"), "0")?;
            // An OOM kill ends the whole tree, not one process of it.
            write_if_present(&dir.join("memory.oom.group"), "1")?;
        } else {
            std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
            write_if_present(&dir.join("memory.memsw.limit_in_bytes"), &bytes.to_string())?;
        }
    }
    if let Some(percent) = limits.cpu_percent {
        let quota = ((percent / 100.0) * CPU_PERIOD_US as f64)
            .round()
            .max(1000.0) as u64;
        let (dir, v2) = dir_for(Controller::Cpu, legacy)?;
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
    }
    if let Some(pids) = limits.pids.filter(|_| !limits.pids_by_rlimit) {
        let (dir, _) = dir_for(Controller::Pids, legacy)?;
        std::fs::write(dir.join("pids.max"), pids.to_string())?;
    }
    Ok(())
}

fn write_if_present(path: &Path, value: &str) -> std::io::Result<()> {
    match std::fs::write(path, value) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// How many processes the memory controller killed in a process's group.
pub fn oom_kills(
    host: &Controllers,
    unified: Option<&Path>,
    legacy: &[(Controller, PathBuf)],
) -> u64 {
    let (file, dir) = match host.memory.as_ref() {
        Some(Place::Unified) => match unified {
            Some(d) => ("memory.events", d.to_path_buf()),
            None => return 0,
        },
        Some(Place::Legacy(_)) => match legacy.iter().find(|(c, _)| *c == Controller::Memory) {
            Some((_, d)) => ("memory.oom_control", d.clone()),
            None => return 0,
        },
        None => return 0,
    };
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Find the controllers the server can use. `unified` is the server's
/// cgroup v2 subtree root, if it has one: controllers its parent offers
/// are enabled for its children there. The rest are looked for in cgroup
/// v1 hierarchies, where a group `exec-server-<pid>` is made.
pub fn find_controllers(unified: Option<&Path>) -> Controllers {
    let mut found = Controllers::default();
    if let Some(root) = unified {
        let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        for controller in [Controller::Memory, Controller::Cpu, Controller::Pids] {
            let name = controller.name();
            if !offered.split_whitespace().any(|c| c == name) {
                continue;
            }
            if std::fs::write(root.join("cgroup.subtree_control"), format!("+{name}")).is_ok() {
                set(&mut found, controller, Place::Unified);
            }
        }
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for controller in [Controller::Memory, Controller::Cpu, Controller::Pids] {
        if found.get(controller).is_some() {
            continue;
        }
        if let Some(root) = legacy_group(controller.name(), &own, &mounts) {
            set(&mut found, controller, Place::Legacy(root));
        }
    }
    found
}

fn set(found: &mut Controllers, controller: Controller, place: Place) {
    match controller {
        Controller::Memory => found.memory = Some(place),
        Controller::Cpu => found.cpu = Some(place),
        Controller::Pids => found.pids = Some(place),
    }
}

/// Make the server's group in the v1 hierarchy of `name`, if there is one
/// and the server may.
fn legacy_group(name: &str, own: &str, mounts: &str) -> Option<PathBuf> {
    // "4:memory:/some/path" (controllers may be co-mounted: "cpu,cpuacct").
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers.split(',').any(|c| c == name).then_some(path)
    })?;
    let (mount_point, mount_root) = mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        if right.next()? != "cgroup" {
            return None;
        }
        let options = right.nth(1)?;
        if !options.split(',').any(|o| o == name) {
            return None;
        }
        let fields: Vec<&str> = left.split(' ').collect();
        Some((PathBuf::from(fields.get(4)?), fields.get(3)?.to_string()))
    })?;
    let relative = path
        .strip_prefix(mount_root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    let root = mount_point
        .join(relative)
        .join(format!("exec-server-{}", std::process::id()));
    match std::fs::create_dir(&root) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => {
            tracing::debug!("no cgroup v1 {name} group ({}): {err}", root.display());
            return None;
        }
    }
    // A group the server can't move a process into is no use.
    if std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("cgroup.procs"))
        .is_err()
    {
        let _ = std::fs::remove_dir(&root);
        return None;
    }
    Some(root)
}

/// Remove a v1 group once nothing is left in it (waits up to `wait` for
/// killed processes to go).
pub fn remove_legacy(dir: &Path, wait: std::time::Duration) {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_legacy(&entry.path(), std::time::Duration::ZERO);
                }
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(err) => {
                tracing::debug!("cgroup {} not removed: {err}", dir.display());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_defaults_caps_and_refuses() {
        let all = Controllers {
            memory: Some(Place::Unified),
            cpu: Some(Place::Unified),
            pids: Some(Place::Unified),
        };
        let policy = Policy {
            defaults: Requested {
                timeout_ms: Some(1000),
                ..Default::default()
            },
            max: Requested {
                timeout_ms: Some(5000),
                pids: Some(100),
                ..Default::default()
            },
        };
        // Nothing asked: the default, else the ceiling.
        let e = policy.apply(None, &all, false).unwrap();
        assert_eq!((e.timeout_ms, e.pids), (Some(1000), Some(100)));
        // Above a ceiling: refused, naming it.
        let asked = Requested {
            pids: Some(101),
            ..Default::default()
        };
        let err = policy
            .apply(Some(&asked), &all, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.pids 101"), "{err}");
        // Not enforceable: refused, or dropped and named with bestEffort.
        let asked = Requested {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        };
        let none = Controllers::default();
        let err = Policy::default()
            .apply(Some(&asked), &none, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("limits.memoryBytes cannot be enforced"),
            "{err}"
        );
        let lax = Requested {
            best_effort: true,
            ..asked
        };
        // pids in a sandbox's own user namespace: RLIMIT_NPROC.
        let pids = Requested {
            pids: Some(32),
            ..Default::default()
        };
        let e = Policy::default().apply(Some(&pids), &none, true).unwrap();
        assert_eq!((e.pids, e.pids_by_rlimit), (Some(32), true));
        assert!(Policy::default().apply(Some(&pids), &none, false).is_err());
        let e = Policy::default().apply(Some(&lax), &none, false).unwrap();
        assert_eq!(
            (e.memory_bytes, e.not_enforced),
            (None, vec!["memoryBytes"])
        );
    }
}
