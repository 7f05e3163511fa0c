//! `fs/watch`: every create, write, rename and removal in a tree of
//! 10,000 files is reported once; past the queue's bound one `overflow`
//! stands for what was dropped; a sandboxed watch sees nothing of a denied
//! subtree; a resumed session reads back what it missed; bad requests are
//! named; the inotify instance goes with the watch.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, TIMEOUT, bin};

fn uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// A watch's id and the seq of its last notification taken.
struct Watched {
    id: String,
    seq: u64,
}

impl Watched {
    fn new(started: &Value) -> Watched {
        Watched {
            id: started["watchId"].as_str().unwrap().to_string(),
            seq: 0,
        }
    }
}

/// `fs/changed` events of `watch` until `done` says so of all of them
/// (or the time runs out); with the seqs each came with.
fn changes_until(
    s: &mut Server,
    watch: &mut Watched,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    let mut events = Vec::new();
    while !done(&events) {
        assert!(
            Instant::now() < deadline,
            "{} events so far; the last: {:?}",
            events.len(),
            events.last()
        );
        let Some(msg) = s.recv_line(Duration::from_millis(500)) else {
            continue;
        };
        if msg["method"] != "fs/changed" || msg["params"]["watchId"] != watch.id.as_str() {
            continue;
        }
        let seq = msg["params"]["seq"].as_u64().unwrap();
        assert_eq!(seq, watch.seq + 1, "notifications out of order");
        watch.seq = seq;
        events.extend(msg["params"]["events"].as_array().unwrap().iter().cloned());
    }
    events
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Each path once: the set, and that nothing came twice.
fn unique_paths(events: &[&Value], key: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for e in events {
        let p = e[key].as_str().unwrap().to_string();
        assert!(seen.insert(p.clone()), "{p} reported twice");
    }
    seen
}

/// Do `op` on each of `items`, in bursts of 1,000.
fn in_bursts<T>(items: &[T], op: impl Fn(&T)) {
    for (i, item) in items.iter().enumerate() {
        op(item);
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn every_change_in_a_tree_of_ten_thousand_files_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let mut s = Server::started(&[]);
    let watch = s.call("fs/watch", json!({"path": uri(&root), "recursive": true}));
    let mut id = Watched::new(&watch);
    // Ten directories, made while watched: each is reported, then watched.
    let dirs: Vec<PathBuf> = (0..10).map(|d| root.join(format!("d{d}"))).collect();
    for d in &dirs {
        std::fs::create_dir(d).unwrap();
    }
    let got = changes_until(&mut s, &mut id, |e| of_kind(e, "created").len() >= 10);
    assert_eq!(
        unique_paths(&of_kind(&got, "created"), "path"),
        dirs.iter().map(|d| uri(d)).collect()
    );
    std::thread::sleep(Duration::from_millis(200));
    let files: Vec<PathBuf> = (0..10_000)
        .map(|i| dirs[i % 10].join(format!("f{i}")))
        .collect();
    let expected: BTreeSet<String> = files.iter().map(|f| uri(f)).collect();

    in_bursts(&files, |f| {
        std::fs::File::create(f).unwrap();
    });
    let got = changes_until(&mut s, &mut id, |e| e.len() >= 10_000);
    assert!(
        of_kind(&got, "overflow").is_empty(),
        "overflow while creating"
    );
    assert_eq!(got.len(), 10_000);
    assert_eq!(unique_paths(&of_kind(&got, "created"), "path"), expected);

    in_bursts(&files, |f| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(f).unwrap();
        file.write_all(b"more\n").unwrap();
    });
    let got = changes_until(&mut s, &mut id, |e| e.len() >= 10_000);
    assert_eq!(got.len(), 10_000);
    assert_eq!(unique_paths(&of_kind(&got, "modified"), "path"), expected);

    let renamed: Vec<PathBuf> = files.iter().map(|f| f.with_extension("moved")).collect();
    in_bursts(&files, |f| {
        std::fs::rename(f, f.with_extension("moved")).unwrap()
    });
    let got = changes_until(&mut s, &mut id, |e| e.len() >= 10_000);
    assert_eq!(got.len(), 10_000);
    let renames = of_kind(&got, "renamed");
    assert_eq!(
        renames.len(),
        10_000,
        "{:?}",
        got.iter().find(|e| e["kind"] != "renamed")
    );
    assert_eq!(unique_paths(&renames, "path"), expected);
    let to: HashMap<String, String> = renames
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["toPath"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (f, r) in files.iter().zip(&renamed) {
        assert_eq!(to[&uri(f)], uri(r));
    }

    in_bursts(&renamed, |f| std::fs::remove_file(f).unwrap());
    let got = changes_until(&mut s, &mut id, |e| e.len() >= 10_000);
    assert_eq!(got.len(), 10_000);
    assert_eq!(
        unique_paths(&of_kind(&got, "removed"), "path"),
        renamed.iter().map(|f| uri(f)).collect()
    );
    // Nothing more comes.
    std::thread::sleep(Duration::from_millis(300));
    let extra = changes_until(&mut s, &mut id, |_| true);
    assert!(extra.is_empty());
    while let Some(msg) = s.recv_line(Duration::from_millis(100)) {
        assert_ne!(msg["method"], "fs/changed", "an extra change: {msg}");
    }
}

#[test]
fn past_the_queue_bound_one_overflow_stands_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let mut s = Server::started(&[]);
    let watch = s.call(
        "fs/watch",
        json!({"path": uri(&root), "maxQueuedEvents": 100}),
    );
    assert!(watch["watchId"].is_string(), "{watch}");
    // One process makes 5,000 files at once: far more than 100 in a window.
    let script = format!(
        "import os\nfor i in range(5000): open(os.path.join({:?}, 'f%d' % i), 'w').close()",
        root.display().to_string()
    );
    let status = std::process::Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    // Window by window: at most 100 events, then (in one that filled up)
    // one overflow, last.
    let deadline = Instant::now() + TIMEOUT;
    let mut real = Vec::new();
    let mut overflows = 0;
    while overflows == 0 {
        assert!(
            Instant::now() < deadline,
            "no overflow after {} events",
            real.len()
        );
        let Some(msg) = s.recv_line(Duration::from_millis(500)) else {
            continue;
        };
        if msg["method"] != "fs/changed" {
            continue;
        }
        let events = msg["params"]["events"].as_array().unwrap().clone();
        let n = events.iter().filter(|e| e["kind"] == "overflow").count();
        assert!(n <= 1, "{n} overflows in one window");
        if n == 1 {
            assert_eq!(events.last().unwrap()["kind"], "overflow");
            assert!(events.len() <= 101, "{} events in a window", events.len());
            overflows += 1;
        } else {
            assert!(events.len() <= 100, "{} events in a window", events.len());
        }
        real.extend(events.into_iter().filter(|e| e["kind"] != "overflow"));
    }
    // The real ones: each once, of files that exist.
    for path in unique_paths(&real.iter().collect::<Vec<_>>(), "path") {
        let p = PathBuf::from(path.strip_prefix("file://").unwrap());
        assert!(p.exists(), "{path} was reported but does not exist");
    }
}

#[test]
fn a_sandboxed_watch_sees_nothing_of_a_denied_subtree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let open = root.join("open");
    let secret = root.join("secret");
    std::fs::create_dir_all(secret.join("deep")).unwrap();
    std::fs::create_dir(&open).unwrap();
    let sandbox = json!({"permissions": {"type": "managed", "network": "restricted",
        "file_system": {"type": "restricted", "entries": [
            {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
            {"path": {"type": "path", "path": secret.display().to_string()}, "access": "none"}]}}});
    let mut s = Server::started(&[]);
    // The denied directory itself can't be watched.
    let r = s.request(
        "fs/watch",
        json!({"path": uri(&secret), "recursive": true, "sandbox": sandbox}),
    );
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not let"),
        "{r}"
    );
    let watch = s.call(
        "fs/watch",
        json!({"path": uri(&root), "recursive": true, "sandbox": sandbox}),
    );
    let mut id = Watched::new(&watch);
    std::fs::write(secret.join("deep/hidden.txt"), "x").unwrap();
    std::fs::write(secret.join("top.txt"), "x").unwrap();
    std::fs::create_dir(secret.join("newdir")).unwrap();
    std::fs::write(open.join("seen.txt"), "x").unwrap();
    let got = changes_until(&mut s, &mut id, |e| {
        e.iter().any(|c| c["path"] == uri(&open.join("seen.txt")))
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut all = got;
    all.extend(changes_until(&mut s, &mut id, |_| true));
    while let Some(msg) = s.recv_line(Duration::from_millis(200)) {
        if msg["method"] == "fs/changed" {
            all.extend(msg["params"]["events"].as_array().unwrap().iter().cloned());
        }
    }
    let secret_uri = uri(&secret);
    for e in &all {
        let p = e["path"].as_str().unwrap_or("");
        assert!(
            !p.starts_with(&secret_uri),
            "a denied path was reported: {e}"
        );
    }
}

#[test]
fn a_resumed_session_reads_back_the_changes_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let mut s = Server::start_unix(&[]);
    let init = s.request("initialize", json!({"clientName": "it"}));
    let session = init["result"]["sessionId"].as_str().unwrap().to_string();
    s.send(&json!({"method": "initialized"}));
    let watch = s.call("fs/watch", json!({"path": uri(&root), "recursive": true}));
    let mut id = Watched::new(&watch);
    std::fs::write(root.join("before"), "x").unwrap();
    let got = changes_until(&mut s, &mut id, |e| !e.is_empty());
    assert_eq!(got[0]["path"], uri(&root.join("before")));
    // Gone: changes go on meanwhile.
    s.reconnect_unix();
    std::thread::sleep(Duration::from_millis(100));
    let missed: Vec<PathBuf> = (0..500)
        .map(|i| root.join(format!("while-away-{i}")))
        .collect();
    for f in &missed {
        std::fs::write(f, "x").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    s.resume(&session);
    let read = s.call("fs/readChanges", json!({"watchId": id.id, "afterSeq": 1}));
    assert_eq!(read["truncated"], false, "{read}");
    id.seq = read["nextSeq"].as_u64().unwrap() - 1;
    let mut events = Vec::new();
    for batch in read["changes"].as_array().unwrap() {
        events.extend(batch["events"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(
        unique_paths(&of_kind(&events, "created"), "path"),
        missed.iter().map(|f| uri(f)).collect()
    );
    // And it goes on reporting.
    std::fs::write(root.join("after"), "x").unwrap();
    let got = changes_until(&mut s, &mut id, |e| !e.is_empty());
    assert_eq!(got[0]["path"], uri(&root.join("after")));
}

/// The server's inotify instances.
fn inotify_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify"))
        })
        .count()
}

#[test]
fn watches_are_bounded_named_when_wrong_and_released() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let mut s = Server::started(&[]);
    let pid = s.call("server/status", json!({}))["pid"].as_u64().unwrap() as u32;
    let before = inotify_fds(pid);
    for (params, code, words) in [
        (
            json!({"path": uri(&root.join("missing"))}),
            -32004,
            "cannot watch",
        ),
        (
            json!({"path": uri(&root), "maxQueuedEvents": 0}),
            -32602,
            "maxQueuedEvents",
        ),
        (json!({"recursive": true}), -32602, "path"),
    ] {
        let r = s.request("fs/watch", params.clone());
        assert_eq!(r["error"]["code"], code, "{params}: {r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(words),
            "{r}"
        );
    }
    let r = s.request("fs/unwatch", json!({"watchId": "w999"}));
    assert_eq!(r["error"]["code"], -32004, "{r}");
    let mut ids = Vec::new();
    for _ in 0..64 {
        ids.push(s.call("fs/watch", json!({"path": uri(&root)}))["watchId"].clone());
    }
    assert_eq!(inotify_fds(pid), before + 64);
    let r = s.request("fs/watch", json!({"path": uri(&root)}));
    assert_eq!(r["error"]["code"], -32600, "{r}");
    for id in &ids {
        s.call("fs/unwatch", json!({"watchId": id}));
    }
    assert!(
        crate::support::eventually(Duration::from_secs(5), || inotify_fds(pid) == before),
        "{} inotify instances left",
        inotify_fds(pid) - before
    );
    // The session's end releases what it still holds.
    for _ in 0..3 {
        s.call("fs/watch", json!({"path": uri(&root), "recursive": true}));
    }
    s.call("session/end", json!({}));
    assert!(
        crate::support::eventually(Duration::from_secs(5), || inotify_fds(pid) == before),
        "the ended session's watches are still open"
    );
}

#[test]
fn exec_server_watch_prints_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["watch", "--count", "3"])
        .arg(&root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until it says it is watching.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut said).unwrap();
    assert!(said.contains("watching"), "{said}");
    // Empty: a write after the create could come as a `modified` of its
    // own under load.
    std::fs::File::create(root.join("a")).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    std::fs::rename(root.join("a"), root.join("b")).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    std::fs::remove_file(root.join("b")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let r = root.display();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            format!("created  {r}/a"),
            format!("renamed  {r}/a -> {r}/b"),
            format!("removed  {r}/b"),
        ],
        "{text}"
    );
}

/// The library's watcher follows its session across a cut connection:
/// what changed while it was cut comes after the resume, once each.
#[tokio::test]
async fn the_library_watcher_resumes_after_a_cut_and_misses_nothing() {
    use exec_server::client::{Client, ServerCommand};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (server, url) = crate::support::spawn_listening(&[
        "--listen",
        "ws://127.0.0.1:0",
        "--ws-ping-interval-ms",
        "200",
    ]);
    // Killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Killed(server);
    let proxy = crate::support::CuttableProxy::start(url.trim_start_matches("ws://"));
    let client = Client::new(ServerCommand::parse(&format!("ws://{}", proxy.address)).unwrap());
    let mut watcher = client.watch(&root, true).await.unwrap();
    std::fs::write(root.join("before"), "x").unwrap();
    let first = watcher.next().await.unwrap().unwrap();
    assert_eq!(
        first[0].path.as_deref(),
        Some(root.join("before").as_path())
    );
    assert!(proxy.cut() > 0);
    let during: BTreeSet<PathBuf> = (0..200).map(|i| root.join(format!("during-{i}"))).collect();
    // Made empty: a write after the create could fall in the next window
    // under load and come as a `modified` of its own.
    for f in &during {
        std::fs::File::create(f).unwrap();
    }
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < during.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} after the cut",
            got.len(),
            during.len()
        );
        let changes = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("changes after the cut")
            .expect("the watcher resumes")
            .unwrap();
        for change in changes {
            assert_eq!(change.kind, "created", "{change:?}");
            let path = change.path.unwrap();
            assert!(got.insert(path.clone()), "{} came twice", path.display());
        }
    }
    assert_eq!(got, during);
    watcher.unwatch().await.unwrap();
    client.shutdown().await;
}
