//! Per-process limits on the wire (`limits` of `process/start`, the
//! `reason` a process ended for) and their text forms, which the server's
//! `--default-limits`/`--max-limits` and `exec-server run` take.

use serde::{Deserialize, Serialize};

/// The `limits` of `process/start`; also a server's defaults or ceilings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requested {
    /// Memory of the whole tree, in bytes (no swap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU time of the whole tree, in percent of one core (150: one and a
    /// half cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Processes (and threads) alive in the tree at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Wall time from start; then the whole tree is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Bytes of output (all streams); then the action below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// What reaching `outputBytes` does (default `kill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_limit_action: Option<OutputAction>,
    /// Run without the limits this host cannot enforce (named in the
    /// response) instead of refusing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub best_effort: bool,
}

/// What reaching the output budget does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OutputAction {
    /// Kill the whole tree (`reason: "outputLimit"`).
    #[default]
    Kill,
    /// Stop reading: the child blocks on its next write once the pipe is
    /// full, until it is terminated or times out.
    Block,
}

/// Why a process ended, as `process/exited` and `process/read` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// It exited on its own.
    Exited,
    /// A signal ended it (not one the server sent for a limit).
    Signal,
    /// The memory limit: the kernel killed its tree.
    OomKilled,
    /// `timeoutMs` passed; the server killed its tree.
    TimedOut,
    /// `outputBytes` was reached; the server killed its tree.
    OutputLimit,
    /// `process/terminate` (or the end of its session).
    Terminated,
}

impl Reason {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Exited => "exited",
            Reason::Signal => "signal",
            Reason::OomKilled => "oomKilled",
            Reason::TimedOut => "timedOut",
            Reason::OutputLimit => "outputLimit",
            Reason::Terminated => "terminated",
        }
    }
}

// ---- the text forms (flags and the CLI) ----

/// A size: bytes, or with a binary suffix (`512K`, `512M`, `1.5G`, `2GiB`).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix('B')
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(t);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (number, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, ' '),
    };
    let scale: u64 = match unit {
        ' ' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => return Err(format!("`{text}` is not a size (like 512M or 2G)")),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size (like 512M or 2G)"))?;
    let bytes = n * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a size (like 512M or 2G)"));
    }
    Ok(bytes.round() as u64)
}

/// A duration, in milliseconds: `500ms`, `30s`, `10m`, `2h`, `1d`; a bare
/// number is seconds, as `timeout(1)` takes it.
pub fn parse_duration_ms(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let bad = || format!("`{text}` is not a duration (like 30s, 10m or 500ms)");
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000.0)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86_400_000.0)
    } else {
        (t, 1000.0)
    };
    let n: f64 = number.trim().parse().map_err(|_| bad())?;
    let ms = n * scale;
    if !ms.is_finite() || ms < 1.0 || ms > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(ms.round() as u64)
}

/// A number of cores (`1.5`) as percent of one core.
pub fn parse_cpus(text: &str) -> std::result::Result<f64, String> {
    let cores: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of cores (like 1.5)"))?;
    let percent = cores * 100.0;
    if !percent.is_finite() || !(1.0..=100_000.0).contains(&percent) {
        return Err(format!(
            "`{text}` is not a number of cores from 0.01 to 1000"
        ));
    }
    Ok(percent)
}

/// `--default-limits`/`--max-limits`: `memory=512M,cpus=1.5,pids=256,
/// timeout=10m,output=64M` (any subset, in any order).
pub fn parse_spec(text: &str) -> std::result::Result<Requested, String> {
    let mut r = Requested::default();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not KEY=VALUE"))?;
        match key.trim() {
            "memory" => r.memory_bytes = Some(parse_size(value)?),
            "cpus" => r.cpu_percent = Some(parse_cpus(value)?),
            "pids" => {
                r.pids = Some(
                    value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|&n: &u64| n > 0)
                        .ok_or_else(|| format!("`{value}` is not a process count"))?,
                )
            }
            "timeout" => r.timeout_ms = Some(parse_duration_ms(value)?),
            "output" => r.output_bytes = Some(parse_size(value)?),
            other => {
                return Err(format!(
                    "unknown limit `{other}` (memory, cpus, pids, timeout, output)"
                ));
            }
        }
    }
    Ok(r)
}

/// The text form [`parse_spec`] reads back.
pub fn spec_text(limits: &Requested) -> String {
    let mut items = Vec::new();
    if let Some(v) = limits.memory_bytes {
        items.push(format!("memory={v}"));
    }
    if let Some(v) = limits.cpu_percent {
        items.push(format!("cpus={}", v / 100.0));
    }
    if let Some(v) = limits.pids {
        items.push(format!("pids={v}"));
    }
    if let Some(v) = limits.timeout_ms {
        items.push(format!("timeout={v}ms"));
    }
    if let Some(v) = limits.output_bytes {
        items.push(format!("output={v}"));
    }
    items.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_specs_parse_as_a_person_writes_them() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("5X").is_err());
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("3"), Ok(3000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert!(parse_duration_ms("soon").is_err());
        assert_eq!(parse_cpus("1.5"), Ok(150.0));
        assert!(parse_cpus("0").is_err());
        let spec = parse_spec("memory=1G, cpus=0.5,pids=64,timeout=90s,output=1M").unwrap();
        assert_eq!(spec.memory_bytes, Some(1 << 30));
        assert_eq!(spec.cpu_percent, Some(50.0));
        assert_eq!(spec.pids, Some(64));
        assert_eq!(spec.timeout_ms, Some(90_000));
        assert_eq!(spec.output_bytes, Some(1 << 20));
        assert!(
            parse_spec("mem=1G")
                .unwrap_err()
                .contains("unknown limit `mem`")
        );
        assert_eq!(parse_spec(&spec_text(&spec)).unwrap(), spec);
    }
}
