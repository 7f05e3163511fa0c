//! Filesystem methods against real files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, b64, unb64};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn err_of(r: &Value) -> (i64, String) {
    (
        r["error"]["code"].as_i64().unwrap_or(0),
        r["error"]["data"]["kind"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

#[test]
fn every_byte_value_round_trips() {
    let dir = tmp();
    let mut s = Server::started(&[]);
    let data: Vec<u8> = (0..=255u8).cycle().take(256 * 40).collect();
    let file = dir.path().join("bin");
    s.call(
        "fs/writeFile",
        json!({"path": p(&file), "dataBase64": b64(&data)}),
    );
    assert_eq!(std::fs::read(&file).unwrap(), data);
    let r = s.call("fs/readFile", json!({"path": p(&file)}));
    assert_eq!(unb64(&r["dataBase64"]), data);
}

#[test]
fn concurrent_reader_never_sees_a_partial_write() {
    let dir = tmp();
    let file = dir.path().join("f");
    let a = vec![b'a'; 200_000];
    let b = vec![b'b'; 300_000];
    std::fs::write(&file, &a).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = std::fs::read(&file).unwrap();
                let whole_a = data.len() == 200_000 && data.iter().all(|&c| c == b'a');
                let whole_b = data.len() == 300_000 && data.iter().all(|&c| c == b'b');
                assert!(whole_a || whole_b, "partial file of {} bytes", data.len());
                reads += 1;
            }
            reads
        })
    };
    let mut s = Server::started(&[]);
    for i in 0..100 {
        let data = if i % 2 == 0 { &b } else { &a };
        s.call(
            "fs/writeFile",
            json!({"path": p(&file), "dataBase64": b64(data)}),
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 0);
}

#[test]
fn write_keeps_an_existing_files_mode_and_follows_links() {
    let dir = tmp();
    let file = dir.path().join("script.sh");
    std::fs::write(&file, "old").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o750)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let mut s = Server::started(&[]);
    s.call(
        "fs/writeFile",
        json!({"path": p(&link), "dataBase64": b64(b"new")}),
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    // Without following, the link itself is replaced by a file.
    s.call(
        "fs/writeFile",
        json!({"path": p(&link), "dataBase64": b64(b"own"), "followSymlinks": false}),
    );
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
}

#[test]
fn create_directory_metadata_and_read_directory() {
    let dir = tmp();
    let mut s = Server::started(&[]);
    let deep = dir.path().join("a/b/c");
    let r = s.request("fs/createDirectory", json!({"path": p(&deep)}));
    assert_eq!(err_of(&r), (-32004, "notFound".into()));
    s.call(
        "fs/createDirectory",
        json!({"path": p(&deep), "recursive": true}),
    );
    std::fs::write(dir.path().join("a/file"), "12345").unwrap();
    std::os::unix::fs::symlink("b", dir.path().join("a/tob")).unwrap();
    let meta = s.call(
        "fs/getMetadata",
        json!({"path": p(&dir.path().join("a/file"))}),
    );
    assert_eq!(meta["isFile"], true);
    assert_eq!(meta["size"], 5);
    assert!(meta["modifiedAtMs"].as_i64().unwrap() > 1_600_000_000_000);
    let link = s.call(
        "fs/getMetadata",
        json!({"path": p(&dir.path().join("a/tob")), "followSymlinks": false}),
    );
    assert_eq!(link["isSymlink"], true);
    assert_eq!(link["isDirectory"], false);
    let listing = s.call(
        "fs/readDirectory",
        json!({"path": p(&dir.path().join("a"))}),
    );
    assert_eq!(
        listing["entries"],
        json!([
            {"fileName": "b", "isDirectory": true, "isFile": false},
            {"fileName": "file", "isDirectory": false, "isFile": true},
            {"fileName": "tob", "isDirectory": true, "isFile": false},
        ])
    );
}

#[test]
fn copy_of_a_tree_keeps_links_empty_dirs_and_executables() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("run.sh", src.join("alias")).unwrap();
    let dst = dir.path().join("dst");
    let mut s = Server::started(&[]);
    let r = s.request(
        "fs/copy",
        json!({"sourcePath": p(&src), "destinationPath": p(&dst), "recursive": false}),
    );
    assert_eq!(err_of(&r).1, "isADirectory");
    s.call(
        "fs/copy",
        json!({"sourcePath": p(&src), "destinationPath": p(&dst), "recursive": true}),
    );
    assert!(dst.join("empty").is_dir());
    assert_eq!(std::fs::read_dir(dst.join("empty")).unwrap().count(), 0);
    assert_eq!(
        std::fs::metadata(dst.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(dst.join("alias")).unwrap(),
        Path::new("run.sh")
    );
}

#[test]
fn rename_moves_and_remove_honours_recursive_and_force() {
    let dir = tmp();
    let mut s = Server::started(&[]);
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    std::fs::write(a.join("x"), "x").unwrap();
    let b = dir.path().join("b");
    s.call(
        "fs/rename",
        json!({"sourcePath": p(&a), "destinationPath": p(&b)}),
    );
    assert!(!a.exists() && b.join("x").is_file());
    let r = s.request("fs/remove", json!({"path": p(&b)}));
    assert_eq!(err_of(&r), (-32600, "directoryNotEmpty".into()));
    s.call("fs/remove", json!({"path": p(&b), "recursive": true}));
    assert!(!b.exists());
    let r = s.request("fs/remove", json!({"path": p(&b)}));
    assert_eq!(err_of(&r), (-32004, "notFound".into()));
    s.call("fs/remove", json!({"path": p(&b), "force": true}));
}

#[test]
fn canonicalize_resolves_links_and_dots() {
    let dir = tmp();
    let real = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::create_dir(real.join("d")).unwrap();
    std::os::unix::fs::symlink(real.join("d"), real.join("l")).unwrap();
    let mut s = Server::started(&[]);
    let r = s.call(
        "fs/canonicalize",
        json!({"path": format!("{}/l/../d", p(&real))}),
    );
    assert_eq!(r["path"], format!("file://{}", p(&real.join("d"))));
}

fn tree(dir: &Path) {
    // dir/{a/{a1/{deep}, a2}, b, f1, f2, f3}
    std::fs::create_dir_all(dir.join("a/a1/deep")).unwrap();
    std::fs::create_dir_all(dir.join("a/a2")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    for f in ["f1", "f2", "f3"] {
        std::fs::write(dir.join(f), f).unwrap();
    }
}

fn walk(s: &mut Server, dir: &Path, depth: u64, dirs: u64, entries: u64) -> Value {
    s.call(
        "fs/walk",
        json!({"path": p(dir), "options": {"maxDepth": depth, "maxDirectories": dirs, "maxEntries": entries, "followDirectorySymlinks": false}}),
    )
}

#[test]
fn walk_limits_each_truncate() {
    let dir = tmp();
    tree(dir.path());
    let mut s = Server::started(&[]);
    let full = walk(&mut s, dir.path(), 10, 100, 100);
    assert_eq!(full["truncated"], false);
    assert_eq!(full["entries"].as_array().unwrap().len(), 8);
    assert_eq!(
        full["entries"][0],
        json!({"path": p(&dir.path().join("a")), "kind": "directory"})
    );
    let by_depth = walk(&mut s, dir.path(), 1, 100, 100);
    assert_eq!(by_depth["truncated"], true);
    assert_eq!(by_depth["entries"].as_array().unwrap().len(), 5);
    let by_dirs = walk(&mut s, dir.path(), 10, 2, 100);
    assert_eq!(by_dirs["truncated"], true);
    let by_entries = walk(&mut s, dir.path(), 10, 100, 3);
    assert_eq!(by_entries["truncated"], true);
    assert_eq!(by_entries["entries"].as_array().unwrap().len(), 3);
}

#[test]
fn read_block_at_offsets_and_exactly_at_eof() {
    let dir = tmp();
    let file = dir.path().join("data");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let mut s = Server::started(&[]);
    s.call("fs/open", json!({"handleId": "h", "path": p(&file)}));
    for (offset, len) in [(0usize, 10usize), (1234, 500), (9990, 10), (9995, 100)] {
        let r = s.call(
            "fs/readBlock",
            json!({"handleId": "h", "offset": offset, "len": len}),
        );
        let end = (offset + len).min(data.len());
        assert_eq!(unb64(&r["chunk"]), &data[offset..end], "offset {offset}");
        assert_eq!(r["eof"], end == data.len(), "offset {offset}");
    }
    let at_eof = s.call(
        "fs/readBlock",
        json!({"handleId": "h", "offset": 10_000, "len": 10}),
    );
    assert_eq!(at_eof, json!({"chunk": "", "eof": true}));
    s.call("fs/close", json!({"handleId": "h"}));
    let r = s.request(
        "fs/readBlock",
        json!({"handleId": "h", "offset": 0, "len": 1}),
    );
    assert_eq!(r["error"]["message"], "unknown handle id h");
}

#[test]
fn the_129th_open_handle_is_refused() {
    let dir = tmp();
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let mut s = Server::started(&[]);
    for i in 0..128 {
        s.call(
            "fs/open",
            json!({"handleId": format!("h{i}"), "path": p(&file)}),
        );
    }
    let r = s.request("fs/open", json!({"handleId": "h128", "path": p(&file)}));
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("128"));
    s.call("fs/close", json!({"handleId": "h0"}));
    s.call("fs/open", json!({"handleId": "h128", "path": p(&file)}));
    let long = s.request(
        "fs/open",
        json!({"handleId": "x".repeat(33), "path": p(&file)}),
    );
    assert_eq!(long["error"]["code"], -32602);
}

#[test]
fn opening_a_fifo_fails_at_once() {
    let dir = tmp();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(p(&fifo)).unwrap();
    // SAFETY: plain syscall with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut s = Server::started(&[]);
    let started = Instant::now();
    let open = s.request("fs/open", json!({"handleId": "f", "path": p(&fifo)}));
    let read = s.request("fs/readFile", json!({"path": p(&fifo)}));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err_of(&open), (-32600, "notARegularFile".into()));
    assert_eq!(err_of(&read), (-32600, "notARegularFile".into()));
}

#[test]
fn read_file_over_the_message_limit_points_to_streaming() {
    let dir = tmp();
    let file = dir.path().join("big");
    std::fs::write(&file, vec![0u8; 10_000]).unwrap();
    let mut s = Server::started(&["--max-message-bytes", "4096"]);
    let r = s.request("fs/readFile", json!({"path": p(&file)}));
    assert_eq!(err_of(&r), (-32600, "fileTooLarge".into()));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fs/readBlock")
    );
}

#[test]
fn error_cases_have_their_codes_and_kinds() {
    let dir = tmp();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let mut s = Server::started(&[]);
    let cases = [
        (
            "fs/readFile",
            json!({"path": p(&dir.path().join("missing"))}),
            -32004,
            "notFound",
        ),
        (
            "fs/readFile",
            json!({"path": p(dir.path())}),
            -32600,
            "isADirectory",
        ),
        (
            "fs/readDirectory",
            json!({"path": p(&file)}),
            -32600,
            "notADirectory",
        ),
        (
            "fs/readFile",
            json!({"path": "relative/path"}),
            -32602,
            "invalidParams",
        ),
        (
            "fs/copy",
            json!({"sourcePath": p(&file), "destinationPath": p(&file), "recursive": false}),
            -32600,
            "sameFile",
        ),
        (
            "fs/createDirectory",
            json!({"path": p(dir.path())}),
            -32600,
            "alreadyExists",
        ),
    ];
    for (method, params, code, kind) in cases {
        let r = s.request(method, params.clone());
        assert_eq!(
            err_of(&r),
            (code, kind.to_string()),
            "{method} {params} -> {r}"
        );
        let errno = &r["error"]["data"]["errno"];
        assert!(
            kind == "invalidParams" || kind == "sameFile" || errno.is_i64(),
            "{r}"
        );
    }
}

#[test]
fn file_uri_with_percent_escapes_is_decoded() {
    let dir = tmp();
    let file = dir.path().join("a b%c.txt");
    std::fs::write(&file, "spaced").unwrap();
    let mut s = Server::started(&[]);
    let uri = format!("file://{}/a%20b%25c.txt", p(dir.path()));
    let r = s.call("fs/readFile", json!({"path": uri}));
    assert_eq!(unb64(&r["dataBase64"]), b"spaced");
}

/// `stat` says 0 bytes for `/proc/self/pagemap`, which is far larger than
/// any message: the read stops at the limit, and the server goes on.
#[test]
fn read_file_of_an_endless_proc_file_stops_at_the_message_limit() {
    let mut s = Server::started(&["--max-message-bytes", "1048576"]);
    for sandbox in [
        json!(null),
        json!({"permissions": {"type": "managed", "network": "restricted", "file_system": {
            "type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"}]}}}),
    ] {
        let started = Instant::now();
        let r = s.request(
            "fs/readFile",
            json!({"path": "/proc/self/pagemap", "sandbox": sandbox}),
        );
        assert_eq!(err_of(&r), (-32600, "fileTooLarge".into()), "{r}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let r = s.call("fs/readFile", json!({"path": "/proc/self/stat"}));
    assert!(!unb64(&r["dataBase64"]).is_empty());
}

/// A copy that fails half-way (a FIFO inside the tree can't be copied)
/// leaves neither a partial destination nor a temporary file behind.
#[test]
fn a_failed_copy_leaves_no_partial_destination() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("a/one"), "1").unwrap();
    let fifo = std::ffi::CString::new(p(&src.join("z-fifo"))).unwrap();
    // SAFETY: plain syscall with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let dst = dir.path().join("dst");
    let mut s = Server::started(&[]);
    let r = s.request(
        "fs/copy",
        json!({"sourcePath": p(&src), "destinationPath": p(&dst), "recursive": true}),
    );
    assert!(r.get("error").is_some(), "{r}");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["src"], "left behind: {names:?}");
    // A file copy replaces its destination whole.
    std::fs::write(dir.path().join("old"), "old contents").unwrap();
    s.call(
        "fs/copy",
        json!({"sourcePath": p(&src.join("a/one")), "destinationPath": p(&dir.path().join("old"))}),
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("old")).unwrap(),
        "1"
    );
}
