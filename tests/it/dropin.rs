//! What an unchanged reference orchestrator relies on (issue 21): the
//! reference's request ordering under `--concurrent-requests`, and the
//! reference's shapes where they differ from ours by default.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, b64};

/// Send a request by hand; its id.
fn send(s: &mut Server, method: &str, params: Value) -> i64 {
    let id = s.take_id();
    s.send(&json!({"id": id, "method": method, "params": params}));
    id
}

/// A process that never reads its stdin (nor ends on SIGINT), and a write to it that waits for
/// room (4 MiB writes fill its 8 MiB queue; the one after waits): the id
/// of that waiting write.
fn stuck_write(s: &mut Server, process: &str) -> i64 {
    // Deaf to SIGINT, so that `process/signal` can be sent meanwhile.
    let argv = ["sh", "-c", "trap '' INT; exec sleep 60"];
    s.start_process(process, &argv, json!({"pipeStdin": true}));
    let chunk = b64(&vec![b'x'; 4 << 20]);
    for n in 0..4 {
        let params = json!({"processId": process, "chunk": chunk, "writeId": format!("w{n}")});
        let id = send(s, "process/write", params);
        if s.no_response_for(id, Duration::from_millis(300)) {
            return id;
        }
        let answer = s.response(id);
        assert!(answer.get("error").is_none(), "{answer}");
    }
    panic!("every write was answered although the child reads nothing");
}

const QUIET: Duration = Duration::from_millis(500);

#[test]
fn one_request_at_a_time_holds_ordinary_requests_and_lets_control_ones_through() {
    let mut s = Server::started(&["--concurrent-requests", "1"]);
    let waiting = stuck_write(&mut s, "w");
    let meta = send(&mut s, "fs/getMetadata", json!({"path": "/tmp"}));
    let list = send(&mut s, "process/list", json!({}));
    assert!(
        s.no_response_for(meta, QUIET),
        "an ordinary request ran beside a waiting one"
    );
    // Control requests don't queue: info, status, a long-poll read, and
    // the terminate that unblocks the write.
    assert!(s.request("environment/info", json!({}))["result"].is_object());
    assert_eq!(
        s.request("environment/status", json!({}))["result"]["status"],
        "ready"
    );
    let poll = send(
        &mut s,
        "process/read",
        json!({"processId": "w", "afterSeq": 0, "waitMs": 20000}),
    );
    assert!(
        s.request(
            "process/signal",
            json!({"processId": "w", "signal": "interrupt"})
        )["result"]
            .is_object()
    );
    assert!(s.no_response_for(meta, QUIET));
    let terminate = s.request("process/terminate", json!({"processId": "w"}));
    assert_eq!(terminate["result"]["running"], true, "{terminate}");
    // Then the queue moves, in arrival order (the read ends too).
    let wanted = [waiting, meta, list, poll];
    let mut order = Vec::new();
    while order.len() < wanted.len() {
        let msg = s
            .recv_line(crate::support::TIMEOUT)
            .expect("the queued answers");
        if let Some(id) = msg["id"].as_i64().filter(|id| wanted.contains(id)) {
            assert!(msg.get("error").is_none() || id == waiting, "{msg}");
            order.push(id);
        }
    }
    order.retain(|id| *id != poll);
    assert_eq!(order, [waiting, meta, list]);
}

#[test]
fn without_the_flag_nothing_waits_for_a_waiting_write() {
    let mut s = Server::started(&[]);
    let waiting = stuck_write(&mut s, "w");
    let meta = s.request("fs/getMetadata", json!({"path": "/tmp"}));
    assert_eq!(meta["result"]["isDirectory"], true, "{meta}");
    s.call("process/terminate", json!({"processId": "w"}));
    assert!(s.response(waiting).is_object());
}

#[test]
fn n_requests_at_once_then_the_next_waits_its_turn() {
    let mut s = Server::started(&["--concurrent-requests", "2"]);
    let first = stuck_write(&mut s, "a");
    // One place is left: the second stuck write takes it.
    let second = stuck_write(&mut s, "b");
    let meta = send(&mut s, "fs/getMetadata", json!({"path": "/tmp"}));
    assert!(
        s.no_response_for(meta, QUIET),
        "a third request ran beside two"
    );
    s.call("process/terminate", json!({"processId": "b"}));
    assert!(s.response(second).is_object());
    assert_eq!(s.response(meta)["result"]["isDirectory"], true);
    s.call("process/terminate", json!({"processId": "a"}));
    assert!(s.response(first).is_object());
}

#[test]
fn a_count_of_zero_is_refused_at_start() {
    let out = std::process::Command::new(crate::support::bin())
        .args(["--stdio", "--concurrent-requests", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrent-requests"));
}

/// `workspaceRoots: []` (explicitly empty): no workspace root is writable,
/// not even the server's own (its cwd, the default root), and what the
/// policy lets it read still runs and reads, in a process and in an fs
/// method. The same policy without `workspaceRoots` writes the server's
/// root: the emptiness is what made the difference.
#[test]
fn an_empty_workspace_roots_list_makes_no_root_writable_and_starts_fine() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let mut cmd = std::process::Command::new(crate::support::bin());
    cmd.arg("--stdio").current_dir(&root);
    let mut s = Server::from_command(cmd);
    s.handshake();
    let policy = |roots: Option<Value>| {
        let mut sandbox = json!({"permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
                {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"}]}}});
        if let Some(roots) = roots {
            sandbox["workspaceRoots"] = roots;
        }
        sandbox
    };
    let script = "cat /etc/hostname >/dev/null && echo read; echo x > f && echo wrote";
    let run = |s: &mut Server, id: &str, sandbox: Value| {
        s.start_process(
            id,
            &["/bin/sh", "-c", script],
            json!({"cwd": root.to_str().unwrap(), "sandbox": sandbox}),
        );
        let (out, _) = s.collect(id);
        String::from_utf8_lossy(&out).into_owned()
    };
    let out = run(&mut s, "empty", policy(Some(json!([]))));
    assert!(out.contains("read\n"), "{out}");
    assert!(!out.contains("wrote"), "{out}");
    assert!(!root.join("f").exists());
    let file = s.call(
        "fs/readFile",
        json!({"path": "/etc/hostname", "sandbox": policy(Some(json!([])))}),
    );
    assert!(file["dataBase64"].is_string());
    let write = s.request(
        "fs/writeFile",
        json!({"path": root.join("g").to_str().unwrap(), "dataBase64": "eA==",
            "sandbox": policy(Some(json!([])))}),
    );
    assert_eq!(
        write["error"]["data"]["kind"], "permissionDenied",
        "{write}"
    );
    // Absent: the server's own root (its cwd).
    let out = run(&mut s, "absent", policy(None));
    assert!(out.contains("wrote"), "{out}");
    assert!(root.join("f").exists());
}

fn write(path: &std::path::Path, text: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn uri(path: &std::path::Path) -> String {
    format!("file://{}", path.to_str().unwrap())
}

/// `capabilityRoots/discoverV1`: a plugin root's manifest and its declared
/// MCP file (a declaration that leaves the root is a warning), every
/// `SKILL.md` with its `agents/openai.yaml`, sorted, nested plugin
/// manifests as namespaces, files skipped with a warning when too large
/// or not UTF-8, a root that is no directory as that root's error, all in
/// request order; more than 128 roots is -32600.
#[test]
fn capability_discovery_finds_plugins_and_skills_per_root() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let plugin = base.join("plugin");
    write(
        &plugin.join(".codex-plugin/plugin.json"),
        br#"{"name": "p", "mcpServers": "./servers.json", "apps": "../outside.json"}"#,
    );
    write(&plugin.join("servers.json"), br#"{"mcpServers": {}}"#);
    write(&base.join("outside.json"), b"{}");
    write(&plugin.join("skills/b/SKILL.md"), b"# b");
    write(&plugin.join("skills/a/SKILL.md"), b"# a");
    write(&plugin.join("skills/a/agents/openai.yaml"), b"name: a");
    write(&plugin.join(".hidden/h/SKILL.md"), b"# hidden");
    write(
        &plugin.join("nested/.claude-plugin/plugin.json"),
        br#"{"name": "n"}"#,
    );
    write(&plugin.join("nested/s/SKILL.md"), b"# nested");
    write(&plugin.join("bad/SKILL.md"), b"\xff\xfe not utf-8");
    write(&plugin.join("big/SKILL.md"), &vec![b'x'; (1 << 20) + 1]);
    let file = base.join("file");
    write(&file, b"x");
    let mut s = Server::started(&[]);
    let r = s.call(
        "capabilityRoots/discoverV1",
        json!({"roots": [
            {"id": "one", "path": uri(&plugin)},
            {"id": "two", "path": uri(&file)},
            {"id": "three", "path": uri(&plugin.join("skills"))},
        ]}),
    );
    let roots = r["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 3);
    let one = &roots[0];
    assert_eq!(one["id"], "one");
    assert_eq!(one["path"], uri(&plugin));
    assert_eq!(one["error"], Value::Null);
    assert_eq!(
        one["plugin"]["manifest"]["path"],
        uri(&plugin.join(".codex-plugin/plugin.json"))
    );
    assert_eq!(
        one["plugin"]["mcpConfig"]["contents"],
        r#"{"mcpServers": {}}"#
    );
    assert_eq!(one["plugin"]["appsConfig"], Value::Null);
    let skills: Vec<&str> = one["skills"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["instructions"]["path"].as_str().unwrap())
        .collect();
    let want: Vec<String> = [".hidden/h", "nested/s", "skills/a", "skills/b"]
        .iter()
        .map(|p| uri(&plugin.join(p).join("SKILL.md")))
        .collect();
    assert_eq!(skills, want);
    let a = &one["skills"][2];
    assert_eq!(a["metadata"]["contents"], "name: a");
    assert_eq!(one["skills"][3]["metadata"], Value::Null);
    let namespaces: Vec<&str> = one["namespaceManifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        namespaces,
        [
            uri(&plugin.join(".codex-plugin/plugin.json")),
            uri(&plugin.join("nested/.claude-plugin/plugin.json")),
        ]
    );
    let warnings = one["warnings"].to_string();
    assert!(warnings.contains("apps"), "{warnings}");
    assert!(
        warnings.contains("bad/SKILL.md") && warnings.contains("not UTF-8"),
        "{warnings}"
    );
    assert!(
        warnings.contains("big/SKILL.md") && warnings.contains("larger than"),
        "{warnings}"
    );
    assert_eq!(
        roots[1]["error"],
        format!("capability root {} is not a directory", uri(&file))
    );
    // Below a plugin root: the ancestor's manifest names the namespace.
    assert_eq!(roots[2]["plugin"], Value::Null);
    assert_eq!(
        roots[2]["namespaceManifests"][0]["path"],
        uri(&plugin.join(".codex-plugin/plugin.json"))
    );
    let many: Vec<Value> = (0..129)
        .map(|i| json!({"id": i.to_string(), "path": uri(&base)}))
        .collect();
    let r = s.request("capabilityRoots/discoverV1", json!({"roots": many}));
    assert_eq!(r["error"]["code"], -32600);
    assert_eq!(
        r["error"]["message"],
        "capability root discovery accepts at most 128 roots"
    );
    let info = s.call("environment/info", json!({}));
    assert_eq!(info["capabilities"]["capabilityDiscoverySandbox"], true);
}

/// A sandboxed root is scanned inside its sandbox: a link to a denied
/// place is not followed (the kernel refuses the read), the rest is found.
#[test]
fn sandboxed_capability_discovery_follows_only_permitted_links() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let root = base.join("root");
    write(&root.join("ok/SKILL.md"), b"# ok");
    let secret = base.join("secret");
    write(&secret.join("s/SKILL.md"), b"# secret");
    std::os::unix::fs::symlink(&secret, root.join("link")).unwrap();
    let mut s = Server::started(&[]);
    let sandbox = json!({"permissions": {"type": "managed", "network": "restricted", "file_system": {
        "type": "restricted", "entries": [
            {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
            {"path": {"type": "path", "path": secret.to_str().unwrap()}, "access": "deny"}]}}});
    let r = s.call(
        "capabilityRoots/discoverV1",
        json!({"roots": [{"id": "r", "path": uri(&root), "sandbox": sandbox},
                         {"id": "plain", "path": uri(&root)}]}),
    );
    let skills = |n: usize| -> Vec<String> {
        r["roots"][n]["skills"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["instructions"]["contents"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(r["roots"][0]["error"], Value::Null, "{r}");
    assert_eq!(skills(0), ["# ok"], "{r}");
    // Without the sandbox, the link is followed.
    assert_eq!(skills(1), ["# secret", "# ok"], "{r}");
}

/// `environmentConfig/read`: the executor's own Codex layers (system,
/// user, the trusted project's from its root down to `cwd`, legacy
/// managed; requirements), each cut down to the keys asked for, in
/// precedence order, with the cloud insertion index after the system
/// layer; an untrusted project adds none; bad params are -32602 and a
/// broken file -32603, in the reference's words.
#[test]
fn environment_config_read_projects_the_executors_layers() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let (system, home, project) = (base.join("etc"), base.join("home"), base.join("work/proj"));
    let codex_home = home.join(".codex");
    let cwd = project.join("sub/deeper");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(project.join(".git")).unwrap();
    write(
        &system.join("config.toml"),
        b"model = \"sys\"\nunasked = 1\n[future_environment]\nrelative_path = \"a\"\nother = 2\n",
    );
    let user = format!(
        "model = \"user\"\n[projects.\"{}\"]\ntrust_level = \"trusted\"\n",
        project.display()
    );
    write(&codex_home.join("config.toml"), user.as_bytes());
    write(
        &project.join(".codex/config.toml"),
        b"model = \"project\"\n",
    );
    write(
        &project.join("sub/.codex/config.toml"),
        b"model = \"sub\"\n",
    );
    write(
        &system.join("managed_config.toml"),
        b"[future_environment]\nrelative_path = \"managed\"\n",
    );
    write(
        &system.join("requirements.toml"),
        b"allowed_approval_policies = [\"never\"]\nx = 1\n",
    );
    let start = |user_config: Option<&str>| {
        if let Some(text) = user_config {
            std::fs::write(codex_home.join("config.toml"), text).unwrap();
        }
        let mut cmd = std::process::Command::new(crate::support::bin());
        cmd.arg("--stdio")
            .env("HOME", &home)
            .env_remove("CODEX_HOME")
            .env("EXEC_SERVER_CODEX_SYSTEM_DIR", &system);
        let mut s = Server::from_command(cmd);
        s.handshake();
        s
    };
    let params = json!({"cwd": uri(&cwd),
        "configPaths": [["model"], ["future_environment", "relative_path"]],
        "requirementsPaths": [["allowed_approval_policies"]]});
    let mut s = start(None);
    let info = s.call("environment/info", json!({}));
    assert_eq!(info["capabilities"]["environmentConfigRead"], true);
    let r = s.call("environmentConfig/read", params.clone());
    assert_eq!(r["userHomeDir"], uri(&home));
    assert_eq!(r["codexHomeDir"], uri(&codex_home));
    assert!(r["hostname"].is_string(), "{r}");
    let layers = r["config"]["layers"].as_array().unwrap();
    let tables: Vec<toml::Table> = layers
        .iter()
        .map(|l| l["toml"].as_str().unwrap().parse().unwrap())
        .collect();
    let want: Vec<toml::Table> = [
        "model = \"sys\"\n[future_environment]\nrelative_path = \"a\"\n",
        "model = \"user\"\n",
        "model = \"project\"\n",
        "model = \"sub\"\n",
        "[future_environment]\nrelative_path = \"managed\"\n",
    ]
    .iter()
    .map(|t| t.parse().unwrap())
    .collect();
    assert_eq!(tables, want, "{r}");
    assert_eq!(r["config"]["cloudInsertionIndex"], 1);
    let bases: Vec<&str> = layers
        .iter()
        .map(|l| l["baseDir"].as_str().unwrap())
        .collect();
    assert_eq!(
        bases,
        [
            uri(&system),
            uri(&codex_home),
            uri(&project.join(".codex")),
            uri(&project.join("sub/.codex")),
            uri(&system)
        ]
    );
    let req = &r["requirements"]["layers"];
    assert_eq!(req.as_array().unwrap().len(), 1);
    let req: toml::Table = req[0]["toml"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        req,
        "allowed_approval_policies = [\"never\"]"
            .parse::<toml::Table>()
            .unwrap()
    );
    // Bad params.
    for (bad, words) in [
        (
            json!({"cwd": uri(&cwd), "configPaths": [], "requirementsPaths": []}),
            "at least one config or requirements path is required",
        ),
        (
            json!({"cwd": uri(&cwd), "configPaths": [[]], "requirementsPaths": []}),
            "TOML paths must contain at least one key segment",
        ),
    ] {
        let r = s.request("environmentConfig/read", bad);
        assert_eq!(r["error"]["code"], -32602, "{r}");
        assert_eq!(r["error"]["message"], words);
    }
    drop(s);
    // Untrusted: no project layers; only the system layer is below the
    // cloud index, and a layer with no asked key is dropped.
    let mut s = start(Some("unrelated = true\n"));
    let r = s.call("environmentConfig/read", params.clone());
    let sources: Vec<&str> = r["config"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources.len(), 2, "{r}");
    assert_eq!(r["config"]["cloudInsertionIndex"], 1);
    drop(s);
    let mut s = start(Some("model = \n"));
    let r = s.request("environmentConfig/read", params);
    assert_eq!(r["error"]["code"], -32603, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("failed to load executor-local config: "),
        "{r}"
    );
}

/// Under `--concurrent-requests`, what waits for a turn is bounded: past
/// 64 MiB of waiting requests, ordinary ones are refused at once
/// (retryable) while control requests are still read, so the terminate
/// that ends the wait gets in, and everything accepted is then answered.
#[test]
fn requests_waiting_for_a_turn_are_bounded_and_the_control_lane_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::started(&["--concurrent-requests", "1"]);
    let waiting = stuck_write(&mut s, "w");
    let data = b64(&vec![b'y'; 4 << 20]);
    let ids: Vec<i64> = (0..20)
        .map(|i| {
            let path = dir.path().join(format!("f{i}"));
            send(
                &mut s,
                "fs/writeFile",
                json!({"path": path.to_str().unwrap(), "dataBase64": data}),
            )
        })
        .collect();
    // About 5.6 MB each: eleven fit the budget, the rest are refused now.
    let mut refused = Vec::new();
    for &id in &ids[11..] {
        let r = s.response(id);
        assert_eq!(r["error"]["code"], -32011, "{r}");
        assert_eq!(r["error"]["data"]["kind"], "overloaded");
        assert_eq!(r["error"]["data"]["retryable"], true);
        refused.push(id);
    }
    assert!(s.no_response_for(ids[0], QUIET));
    s.call("process/terminate", json!({"processId": "w"}));
    assert!(s.response(waiting).is_object());
    for &id in &ids[..11] {
        let r = s.response(id);
        assert!(r["result"].is_object(), "{r}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 11);
}
