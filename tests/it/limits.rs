//! Per-process limits (`limits` of `process/start`): memory, processes and
//! CPU where the host gives the server a cgroup controller (each test
//! checks the up-front refusal where it does not: the unprivileged run),
//! the deadline and the output budget everywhere; the server's defaults
//! and ceilings; `exec-server run --timeout/--memory`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::containment::holding;
use crate::support::{Server, bin, eventually};

/// The limits `environment/info` says this server enforces.
fn enforced(s: &mut Server) -> Vec<String> {
    let info = s.call("environment/info", json!({}));
    info["capabilities"]["limits"]
        .as_array()
        .expect("capabilities.limits")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Wait for the `process/exited` of `id`; its params.
fn exited(s: &mut Server, id: &str) -> Value {
    let id = id.to_string();
    s.notification(move |m| m["method"] == "process/exited" && m["params"]["processId"] == id)["params"]
        .clone()
}

/// A sandbox that reads everything and writes nothing (the PID-namespace
/// mode: the process runs under the sandbox's init).
fn read_only() -> Value {
    json!({"permissions": {"type": "managed", "network": "restricted", "file_system": {
        "type": "restricted", "entries": [
            {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"}]}}})
}

/// Where `name` can't be enforced: refused up front naming it (-32602),
/// and run without it under `bestEffort`, which the response names.
fn refused_up_front(s: &mut Server, name: &str, limits: Value) {
    let r = s.request(
        "process/start",
        json!({"processId": format!("refused-{name}"), "argv": ["true"], "cwd": "/tmp", "limits": limits}),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("limits.{name} cannot be enforced")),
        "{message}"
    );
    let mut lax = limits.clone();
    lax["bestEffort"] = json!(true);
    let started = s.start_process(&format!("lax-{name}"), &["true"], json!({"limits": lax}));
    assert_eq!(started["unenforcedLimits"], json!([name]), "{started}");
    assert_eq!(exited(s, &format!("lax-{name}"))["reason"], "exited");
}

#[test]
fn memory_past_the_limit_ends_oom_killed_and_nothing_else_is_touched() {
    let mut s = Server::started(&[]);
    if !enforced(&mut s).iter().any(|l| l == "memoryBytes") {
        refused_up_front(&mut s, "memoryBytes", json!({"memoryBytes": 64 << 20}));
        return;
    }
    s.start_process("bystander", &["sleep", "30"], json!({}));
    let hog = "x = bytearray(512 << 20); print('allocated', len(x))";
    for (id, extra) in [
        ("hog", json!({"limits": {"memoryBytes": 64 << 20}})),
        (
            "sandboxed-hog",
            json!({"limits": {"memoryBytes": 64 << 20}, "sandbox": read_only()}),
        ),
        // Through a shell: what the kernel kills is the child, and the
        // tree ends with it.
        ("shell-hog", json!({"limits": {"memoryBytes": 64 << 20}})),
    ] {
        let argv: Vec<String> = if id == "shell-hog" {
            vec![
                "sh".into(),
                "-c".into(),
                format!("python3 -c \"{hog}\"; echo after"),
            ]
        } else {
            vec!["python3".into(), "-c".into(), hog.into()]
        };
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        s.start_process(id, &argv, extra);
        let exit = exited(&mut s, id);
        assert_eq!(exit["reason"], "oomKilled", "{id}: {exit}");
        let (out, last) = s.read_until_closed(id);
        assert!(
            !String::from_utf8_lossy(&out).contains("allocated"),
            "{id} allocated past its limit"
        );
        assert_eq!(last["reason"], "oomKilled", "{last}");
    }
    // The server serves on, and the process beside them runs on.
    let list = s.call("process/list", json!({}));
    let bystander = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["processId"] == "bystander")
        .cloned()
        .expect("the bystander is listed");
    assert_eq!(bystander["exited"], false, "{bystander}");
    s.call("process/terminate", json!({"processId": "bystander"}));
    assert_eq!(exited(&mut s, "bystander")["reason"], "terminated");
}

/// Processes in session `sid` (a process's own session: it called setsid).
fn in_session(sid: i32) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let rest = stat.rsplit(')').next().unwrap_or("");
        // state ppid pgrp session
        if rest
            .split_whitespace()
            .nth(3)
            .and_then(|v| v.parse::<i32>().ok())
            == Some(sid)
        {
            n += 1;
        }
    }
    n
}

/// `pid` and every process below it.
fn tree(pid: i32) -> usize {
    let mut parent = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let rest = stat.rsplit(')').next().unwrap_or("");
        if let Some(pp) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<i32>().ok())
        {
            parent.insert(p, pp);
        }
    }
    parent
        .keys()
        .filter(|&&p| {
            let mut at = p;
            for _ in 0..4096 {
                if at == pid {
                    return true;
                }
                match parent.get(&at) {
                    Some(&up) if up > 0 => at = up,
                    _ => return false,
                }
            }
            false
        })
        .count()
}

#[test]
fn a_fork_bomb_under_pids_is_contained_within_a_second_and_goes_away() {
    let mut s = Server::started(&[]);
    let info = s.call("environment/info", json!({}));
    let has = |key: &str| {
        info["capabilities"][key]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "pids")
    };
    // Unsandboxed, pids needs a cgroup; sandboxed, a user namespace of the
    // sandbox's own will do (RLIMIT_NPROC there), whose init counts too.
    // Unsandboxed, the bomb's orphans leave the tree (they stay in the
    // session); sandboxed, they stay below the sandbox's init (in a
    // session of the program's).
    let (plain, sandboxed) = (has("limits"), has("sandboxedLimits"));
    if !plain {
        refused_up_front(&mut s, "pids", json!({"pids": 64}));
    }
    // Every process forks for ever, and retries when a fork fails: a bomb
    // that keeps pressing at the limit (a shell's bomb dies out when its
    // forks fail, and then proves nothing).
    let bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)";
    let ways = [
        ("bomb", json!({"limits": {"pids": 64}}), plain, 64),
        (
            "sandboxed-bomb",
            json!({"limits": {"pids": 64}, "sandbox": read_only()}),
            sandboxed,
            65,
        ),
    ];
    let mut ran = 0;
    for (id, extra, enforced_here, most_allowed) in ways {
        if !enforced_here {
            continue;
        }
        ran += 1;
        s.start_process(id, &["python3", "-c", bomb], extra);
        let pid = s.call("process/list", json!({}))["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["processId"] == id)
            .expect("listed")["pid"]
            .as_i64()
            .unwrap() as i32;
        // It grows to its limit (how fast depends on the machine's load)
        // and never past it: sampled until it is near the limit, then a
        // little longer (a bomb is a heavy load on two cores: no longer
        // than needed).
        let count = |pid: i32| in_session(pid).max(tree(pid));
        let start = Instant::now();
        let mut most = 0;
        let mut near: Option<Instant> = None;
        while start.elapsed() < Duration::from_secs(15)
            && near.is_none_or(|t| t.elapsed() < Duration::from_millis(500))
        {
            most = most.max(count(pid));
            if near.is_none() && most + 8 >= most_allowed {
                near = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            most <= most_allowed,
            "{id} reached {most} processes past pids 64"
        );
        assert!(
            near.is_some(),
            "{id} never came near its limit ({most} processes in 15 s)"
        );
        s.call("process/terminate", json!({"processId": id}));
        assert_eq!(exited(&mut s, id)["reason"], "terminated");
        assert!(
            eventually(Duration::from_secs(10), || count(pid) == 0),
            "{} processes of {id} are left",
            count(pid)
        );
    }
    assert!(
        ran > 0 || !cfg!(target_os = "linux") || !sandboxed,
        "no way ran"
    );
    // The server still starts processes.
    s.start_process("after", &["true"], json!({}));
    assert_eq!(exited(&mut s, "after")["reason"], "exited");
}

#[test]
fn cpu_percent_keeps_a_busy_loop_near_its_share() {
    let mut s = Server::started(&[]);
    if !enforced(&mut s).iter().any(|l| l == "cpuPercent") {
        refused_up_front(&mut s, "cpuPercent", json!({"cpuPercent": 50}));
        return;
    }
    // Two seconds of wall time spinning; what it got, in CPU seconds.
    let spin =
        "import time\nt = time.time()\nwhile time.time() - t < 2: pass\nprint(time.process_time())";
    s.start_process(
        "spin",
        &["python3", "-c", spin],
        json!({"limits": {"cpuPercent": 50}}),
    );
    let (out, last) = s.read_until_closed("spin");
    assert_eq!(last["reason"], "exited");
    let cpu: f64 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    // Half a core of two seconds is one second; unlimited it would be
    // close to two. Wide bounds: these machines are noisy.
    assert!(
        (0.15..=1.5).contains(&cpu),
        "a busy loop under cpuPercent 50 used {cpu} s of CPU in 2 s"
    );
}

#[test]
fn the_deadline_kills_a_tree_with_a_setsid_daemon_and_says_timed_out() {
    let mut s = Server::started(&[]);
    let token = format!("{}", 7_100_000 + std::process::id() % 100_000);
    let script = format!("setsid sleep {token} </dev/null >/dev/null 2>&1 & sleep 1000");
    for (id, sandbox) in [("plain", Value::Null), ("sandboxed", read_only())] {
        let mut extra = json!({"limits": {"timeoutMs": 700}});
        if !sandbox.is_null() {
            extra["sandbox"] = sandbox;
        }
        let began = Instant::now();
        s.start_process(id, &["sh", "-c", &script], extra);
        let exit = exited(&mut s, id);
        assert_eq!(exit["reason"], "timedOut", "{id}: {exit}");
        assert!(
            began.elapsed() >= Duration::from_millis(650),
            "{id}: too early"
        );
        assert!(
            eventually(Duration::from_secs(5), || holding(&token).is_empty()),
            "{id}: the setsid daemon outlived the deadline: {:?}",
            holding(&token)
        );
        let (_, last) = s.read_until_closed(id);
        assert_eq!(last["reason"], "timedOut");
    }
    // A process that ends before its deadline ends as it did.
    s.start_process(
        "quick",
        &["sh", "-c", "exit 3"],
        json!({"limits": {"timeoutMs": 60000}}),
    );
    let exit = exited(&mut s, "quick");
    assert_eq!(
        (exit["exitCode"].clone(), exit["reason"].clone()),
        (json!(3), json!("exited"))
    );
}

#[test]
fn the_output_budget_kills_or_blocks_as_asked() {
    let mut s = Server::started(&[]);
    // Kill: exactly the budget arrives, then the tree is killed.
    s.start_process(
        "chatty",
        &["sh", "-c", "yes 0123456789abcdef"],
        json!({"limits": {"outputBytes": 100_000}}),
    );
    let (out, last) = s.read_until_closed("chatty");
    assert_eq!(out.len(), 100_000);
    assert!(out.starts_with(b"0123456789abcdef\n"));
    assert_eq!(last["reason"], "outputLimit", "{last}");

    // Block: the budget arrives and the child waits on its next write; it
    // never gets past it until terminated.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("past");
    let script = format!(
        "head -c 8000000 /dev/zero; touch {}; sleep 1000",
        marker.display()
    );
    s.start_process(
        "blocked",
        &["sh", "-c", &script],
        json!({"limits": {"outputBytes": 5000, "outputLimitAction": "block"}}),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let r = s.call(
        "process/read",
        json!({"processId": "blocked", "afterSeq": 0}),
    );
    let got: usize = r["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| crate::support::unb64(&c["chunk"]).len())
        .sum();
    assert_eq!(got, 5000);
    assert_eq!(r["exited"], false, "{r}");
    assert!(!marker.exists(), "the child got past a blocked output");
    s.call("process/terminate", json!({"processId": "blocked"}));
    let (out, last) = s.read_until_closed("blocked");
    assert_eq!(out.len(), 5000);
    assert_eq!(last["reason"], "terminated", "{last}");
}

#[test]
fn server_defaults_and_ceilings_apply_and_bad_limits_are_named() {
    let mut s = Server::started(&[
        "--default-limits",
        "timeout=400ms",
        "--max-limits",
        "timeout=3s,output=1M",
    ]);
    let info = s.call("environment/info", json!({}));
    assert_eq!(
        info["limits"],
        json!({"defaults": {"timeoutMs": 400}, "max": {"timeoutMs": 3000, "outputBytes": 1048576}})
    );
    // Nothing asked: the default deadline, and the ceiling's budget.
    s.start_process("defaulted", &["sh", "-c", "sleep 30"], json!({}));
    assert_eq!(exited(&mut s, "defaulted")["reason"], "timedOut");
    s.start_process(
        "capped",
        &["sh", "-c", "yes"],
        json!({"limits": {"timeoutMs": 3000}}),
    );
    let (out, last) = s.read_until_closed("capped");
    assert_eq!(
        (out.len(), last["reason"].clone()),
        (1 << 20, json!("outputLimit"))
    );
    // Above a ceiling, unknown, zero, or malformed: refused, named, and
    // the server serves on.
    for (limits, words) in [
        (json!({"timeoutMs": 5000}), "limits.timeoutMs 5000 is above"),
        (json!({"memory": 5000}), "unknown field `memory`"),
        (json!({"pids": 0}), "limits.pids must be at least 1"),
        (
            json!({"cpuPercent": -5}),
            "limits.cpuPercent must be from 1",
        ),
        (
            json!({"outputLimitAction": "explode"}),
            "unknown variant `explode`",
        ),
        (
            json!({"memoryBytes": 10}),
            "limits.memoryBytes must be at least",
        ),
    ] {
        let r = s.request(
            "process/start",
            json!({"processId": "bad", "argv": ["true"], "cwd": "/tmp", "limits": limits}),
        );
        assert_eq!(r["error"]["code"], -32602, "{limits}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{limits}: {message}");
    }
    s.call("environment/status", json!({}));
    // A cap the host can't hold is refused at start, not at every request.
    if !enforced(&mut s).iter().any(|l| l == "memoryBytes") {
        let out = std::process::Command::new(bin())
            .args(["--stdio", "--max-limits", "memory=1G"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--max-limits memory: this host can't enforce it"),
            "{stderr}"
        );
    }
}

#[test]
fn run_with_timeout_exits_124_and_memory_says_out_of_memory() {
    let started = Instant::now();
    let out = std::process::Command::new(bin())
        .args(["run", "--timeout", "500ms", "--", "sh", "-c", "sleep 100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    assert!(started.elapsed() < Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out after 500ms"), "{stderr}");

    let mut s = Server::started(&[]);
    let memory = enforced(&mut s).iter().any(|l| l == "memoryBytes");
    let out = std::process::Command::new(bin())
        .args([
            "run",
            "--memory",
            "64M",
            "--",
            "python3",
            "-c",
            "x = bytearray(512 << 20)",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if memory {
        assert_eq!(out.status.code(), Some(137), "{stderr}");
        assert!(
            stderr.contains("killed: out of memory (limit 64 MiB)"),
            "{stderr}"
        );
    } else {
        assert_ne!(out.status.code(), Some(0));
        assert!(
            stderr.contains("limits.memoryBytes cannot be enforced"),
            "{stderr}"
        );
        // --best-effort runs it anyway.
        let out = std::process::Command::new(bin())
            .args(["run", "--memory", "64M", "--best-effort", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("does not enforce memoryBytes"), "{stderr}");
    }
}

/// The cgroup directories (v2, and v1 on a hybrid host) a process is in,
/// from `/proc/PID/cgroup`, that the server made (`exec-server-<pid>`).
fn server_cgroups(pid: i32) -> Vec<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if !path.contains("/exec-server-") {
            continue;
        }
        // The mount of that hierarchy.
        for m in mounts.lines() {
            let Some((left, right)) = m.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or("");
            let options = right.nth(1).unwrap_or("");
            let matches = if controllers.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup"
                    && controllers
                        .split(',')
                        .any(|c| options.split(',').any(|o| o == c))
            };
            if matches {
                let root = fields.get(3).copied().unwrap_or("/");
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(path)
                    .trim_start_matches('/');
                found.push(std::path::Path::new(fields.get(4).copied().unwrap_or("/")).join(rel));
            }
        }
    }
    found
}

#[test]
fn a_killed_server_leaves_no_cgroup_of_its_limits_behind() {
    let mut s = Server::started(&[]);
    if !enforced(&mut s).iter().any(|l| l == "memoryBytes") {
        return; // No cgroup is made without a controller (the refusal is tested above).
    }
    s.start_process(
        "held",
        &["sleep", "300"],
        json!({"limits": {"memoryBytes": 64 << 20, "pids": 16, "cpuPercent": 50}}),
    );
    let pid = s.call("process/list", json!({}))["processes"][0]["pid"]
        .as_i64()
        .unwrap() as i32;
    let groups = server_cgroups(pid);
    assert!(
        !groups.is_empty(),
        "the process is in no cgroup of the server's"
    );
    for g in &groups {
        assert!(g.exists(), "{} does not exist", g.display());
    }
    // The server's own groups (exec-server-<pid>), above each process's.
    let roots: Vec<std::path::PathBuf> = groups
        .iter()
        .filter_map(|g| g.parent().map(Into::into))
        .collect();
    s.child.kill().unwrap();
    let _ = s.child.wait();
    assert!(
        eventually(Duration::from_secs(10), || crate::support::pid_gone(pid)),
        "the limited process outlived its server"
    );
    assert!(
        eventually(Duration::from_secs(10), || roots
            .iter()
            .all(|r| !r.exists())),
        "left behind: {:?}",
        roots.iter().filter(|r| r.exists()).collect::<Vec<_>>()
    );
}
