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
    let r = s.request(
        "fs/createDirectory",
        json!({"path": p(&deep), "recursive": false}),
    );
    assert_eq!(err_of(&r), (-32004, "notFound".into()));
    // Parents are made unless `recursive: false` (the reference's default),
    // and an existing directory is fine then.
    s.call("fs/createDirectory", json!({"path": p(&deep)}));
    s.call("fs/createDirectory", json!({"path": p(&deep)}));
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
    let r = s.request("fs/remove", json!({"path": p(&b), "recursive": false}));
    // The reference's class for it: -32603 (not found -32004, permission
    // and invalid input -32600, the rest -32603).
    assert_eq!(err_of(&r), (-32603, "directoryNotEmpty".into()));
    // `recursive` and `force` default to true, as in the reference.
    s.call("fs/remove", json!({"path": p(&b)}));
    assert!(!b.exists());
    let r = s.request("fs/remove", json!({"path": p(&b), "force": false}));
    assert_eq!(err_of(&r), (-32004, "notFound".into()));
    s.call("fs/remove", json!({"path": p(&b)}));
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
        json!({"path": format!("file://{}", p(&dir.path().join("a"))), "kind": "directory"})
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
        // The reference's rule: eof when fewer than `len` came back (a
        // block that ends exactly at the end is not yet eof).
        assert_eq!(r["eof"], end - offset < len, "offset {offset}");
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
    assert_eq!(r["error"]["message"], "unknown file read handle `h`");
    assert_eq!(r["error"]["code"], -32004);
    // Closing what is not open succeeds; blocks are 1 to 1 MiB.
    s.call("fs/close", json!({"handleId": "h"}));
    s.call("fs/open", json!({"handleId": "h", "path": p(&file)}));
    for len in [0, (1 << 20) + 1] {
        let r = s.request(
            "fs/readBlock",
            json!({"handleId": "h", "offset": 0, "len": len}),
        );
        assert_eq!(r["error"]["code"], -32600, "{r}");
        assert_eq!(
            r["error"]["message"],
            "file read block length must be between 1 and 1048576"
        );
    }
    let whole = s.call(
        "fs/readBlock",
        json!({"handleId": "h", "offset": 0, "len": 1 << 20}),
    );
    assert_eq!(unb64(&whole["chunk"]), data);
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
    assert_eq!(
        r["error"]["message"],
        "at most 128 file reads may be open per connection"
    );
    let again = s.request("fs/open", json!({"handleId": "h5", "path": p(&file)}));
    assert_eq!(
        again["error"]["message"],
        "file read handle `h5` already exists"
    );
    s.call("fs/close", json!({"handleId": "h0"}));
    s.call("fs/open", json!({"handleId": "h128", "path": p(&file)}));
    let long = s.request(
        "fs/open",
        json!({"handleId": "x".repeat(33), "path": p(&file)}),
    );
    assert_eq!(long["error"]["code"], -32600);
    assert_eq!(
        long["error"]["message"],
        "file read handle ID must not exceed 32 bytes"
    );
    for method in ["fs/readBlock", "fs/close"] {
        let params = json!({"handleId": "x".repeat(33), "offset": 0, "len": 1});
        let r = s.request(method, params);
        assert_eq!(r["error"]["code"], -32600, "{method}: {r}");
    }
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
    let words = format!("path `{}` is not a file", p(&fifo));
    assert_eq!(open["error"]["message"], words);
    assert_eq!(read["error"]["message"], words);
}

#[test]
fn read_file_over_the_message_limit_points_to_streaming() {
    let dir = tmp();
    let file = dir.path().join("big");
    std::fs::write(&file, vec![0u8; 10_000]).unwrap();
    let mut s = Server::started(&["--max-message-bytes", "4096"]);
    let r = s.request("fs/readFile", json!({"path": p(&file)}));
    assert_eq!(err_of(&r), (-32600, "fileTooLarge".into()));
    // The reference's words, with this server's limit: what fits a message.
    assert_eq!(
        r["error"]["message"],
        "file is too large to read: limit is 3024 bytes"
    );
    // The same file streams.
    s.call("fs/open", json!({"handleId": "h", "path": p(&file)}));
    let block = s.call(
        "fs/readBlock",
        json!({"handleId": "h", "offset": 9500, "len": 1000}),
    );
    assert_eq!(unb64(&block["chunk"]).len(), 500);
    assert_eq!(block["eof"], true);
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
            -32603,
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
            json!({"path": p(dir.path()), "recursive": false}),
            -32603,
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

/// A copy that fails half-way leaves neither a partial destination nor a
/// temporary file behind. (It fails on a path that fits under the source
/// but not under the destination's temporary name, longer by 22 bytes:
/// ENAMETOOLONG, for root too.)
#[test]
fn a_failed_copy_leaves_no_partial_destination() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("a/one"), "1").unwrap();
    let mut deep = src.join("z");
    while deep.as_os_str().len() + 101 < 4000 {
        deep.push("d".repeat(100));
    }
    let pad = 4080 - deep.as_os_str().len() - 1;
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("f".repeat(pad)), "deep").unwrap();
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

/// The reference's fs/copy: its three refusals in its words, and a
/// recursive copy that leaves FIFOs and sockets out instead of failing.
#[test]
fn copy_refuses_in_the_reference_words_and_skips_special_files() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file"), "f").unwrap();
    std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
    let fifo = src.join("fifo");
    let c = std::ffi::CString::new(p(&fifo)).unwrap();
    // SAFETY: plain syscall with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let mut s = Server::started(&[]);
    let copy = |s: &mut Server, from: &Path, to: &Path, recursive: bool| {
        s.request(
            "fs/copy",
            json!({"sourcePath": p(from), "destinationPath": p(to), "recursive": recursive}),
        )
    };
    let cases = [
        (
            copy(&mut s, &src, &dir.path().join("d"), false),
            "fs/copy requires recursive: true when sourcePath is a directory",
        ),
        (
            copy(&mut s, &src, &src.join("sub/inside"), true),
            "fs/copy cannot copy a directory to itself or one of its descendants",
        ),
        (
            copy(&mut s, &src, &src, true),
            "fs/copy cannot copy a directory to itself or one of its descendants",
        ),
        (
            copy(&mut s, &fifo, &dir.path().join("f2"), false),
            "fs/copy only supports regular files, directories, and symlinks",
        ),
    ];
    for (r, words) in cases {
        assert_eq!(r["error"]["code"], -32600, "{r}");
        assert_eq!(r["error"]["message"], words);
    }
    let dst = dir.path().join("dst");
    let r = copy(&mut s, &src, &dst, true);
    assert!(r["result"].is_object(), "{r}");
    let mut names: Vec<String> = std::fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["link", "sub"]);
    assert_eq!(std::fs::read_to_string(dst.join("link")).unwrap(), "f");
}

/// The reference's client reads walk entries as `file:` URIs of kind
/// `directory` or `file`: links count as their targets, a dangling link
/// and special files are left out, linked directories are entered only
/// when asked, hidden ones not with `pruneHiddenDirectories`.
#[test]
fn walk_entries_are_uris_of_two_kinds() {
    let dir = tmp();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::create_dir_all(root.join("d/inner")).unwrap();
    std::fs::create_dir_all(root.join(".hidden/secret")).unwrap();
    std::fs::write(root.join("f"), "x").unwrap();
    std::os::unix::fs::symlink("d", root.join("to-d")).unwrap();
    std::os::unix::fs::symlink("f", root.join("to-f")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
    let c = std::ffi::CString::new(p(&root.join("fifo"))).unwrap();
    // SAFETY: plain syscall with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut s = Server::started(&[]);
    let walk = |s: &mut Server, follow: bool, prune: bool| {
        let r = s.call(
            "fs/walk",
            json!({"path": p(&root), "options": {"maxDepth": 10, "maxDirectories": 100,
                "maxEntries": 100, "followDirectorySymlinks": follow,
                "pruneHiddenDirectories": prune}}),
        );
        let mut entries: Vec<(String, String)> = r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let uri = e["path"].as_str().unwrap();
                let rel = uri
                    .strip_prefix(&format!("file://{}/", p(&root)))
                    .unwrap_or_else(|| panic!("not a file: URI under the root: {uri}"));
                (rel.to_string(), e["kind"].as_str().unwrap().to_string())
            })
            .collect();
        entries.sort();
        entries
    };
    let e = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        walk(&mut s, false, false),
        e(&[
            (".hidden", "directory"),
            (".hidden/secret", "directory"),
            ("d", "directory"),
            ("d/inner", "directory"),
            ("f", "file"),
            ("to-d", "directory"),
            ("to-f", "file"),
        ])
    );
    // Followed, the linked directory's contents appear once (its target
    // is walked already) ...
    let followed = walk(&mut s, true, true);
    assert!(
        !followed
            .iter()
            .any(|(path, _)| path.starts_with(".hidden/")),
        "{followed:?}"
    );
    assert!(followed.contains(&(".hidden".into(), "directory".into())));
    // ... and a linked directory outside the walked tree is entered.
    let outside = tmp();
    std::fs::create_dir(outside.path().join("o")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
    assert!(walk(&mut s, true, false).contains(&("out/o".into(), "directory".into())));
    assert!(!walk(&mut s, false, false).contains(&("out/o".into(), "directory".into())));
}

/// `fs/readDirectory` on a dangling link: neither a file nor a directory.
#[test]
fn read_directory_reports_a_dangling_link_as_neither() {
    let dir = tmp();
    std::os::unix::fs::symlink("nowhere", dir.path().join("dangling")).unwrap();
    std::os::unix::fs::symlink("/", dir.path().join("to-root")).unwrap();
    let mut s = Server::started(&[]);
    let r = s.call("fs/readDirectory", json!({"path": p(dir.path())}));
    assert_eq!(
        r["entries"],
        json!([
            {"fileName": "dangling", "isDirectory": false, "isFile": false},
            {"fileName": "to-root", "isDirectory": true, "isFile": false},
        ])
    );
}

/// A file with two names is written in place, sandboxed or not: both
/// names see the new content and the inode is kept. A file with one name
/// is still replaced whole (atomically).
#[test]
fn write_file_through_a_hard_link_keeps_the_inode() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmp();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let a = root.join("a");
    std::fs::write(&a, "old").unwrap();
    std::fs::hard_link(&a, root.join("b")).unwrap();
    let inode = std::fs::metadata(&a).unwrap().ino();
    let mut s = Server::started(&[]);
    let sandbox = json!({"permissions": {"type": "managed", "network": "restricted", "file_system": {
        "type": "restricted", "entries": [
            {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
            {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"}]}},
        "workspaceRoots": [p(&root)]});
    for (n, sandbox) in [json!(null), sandbox].into_iter().enumerate() {
        let text = format!("new {n}");
        let r = s.request(
            "fs/writeFile",
            json!({"path": p(&root.join("b")), "dataBase64": b64(text.as_bytes()), "sandbox": sandbox}),
        );
        if r["error"]["data"]["kind"] == "sandboxUnavailable" {
            eprintln!("NOTICE: no sandbox here; the sandboxed half is refused up front: {r}");
            continue;
        }
        assert!(r["result"].is_object(), "{r}");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), text);
        assert_eq!(std::fs::metadata(&a).unwrap().ino(), inode);
    }
    let single = root.join("single");
    std::fs::write(&single, "one").unwrap();
    let before = std::fs::metadata(&single).unwrap().ino();
    s.call(
        "fs/writeFile",
        json!({"path": p(&single), "dataBase64": b64(b"two")}),
    );
    assert_ne!(std::fs::metadata(&single).unwrap().ino(), before);
}

/// `private: true`: one directory of mode 0700; refused with `recursive`
/// or a sandbox, in the reference's words.
#[test]
fn private_directories() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let mut s = Server::started(&[]);
    let private = dir.path().join("private");
    s.call(
        "fs/createDirectory",
        json!({"path": p(&private), "private": true}),
    );
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let again = s.request(
        "fs/createDirectory",
        json!({"path": p(&private), "private": true}),
    );
    assert_eq!(err_of(&again), (-32603, "alreadyExists".into()));
    let words = "private directories must be non-recursive and unsandboxed";
    for extra in [
        json!({"recursive": true}),
        json!({"sandbox": {"permissions": {"type": "disabled"}}}),
    ] {
        let mut params = json!({"path": p(&dir.path().join("p2")), "private": true});
        for (k, v) in extra.as_object().unwrap() {
            params[k] = v.clone();
        }
        let r = s.request("fs/createDirectory", params);
        assert_eq!(r["error"]["code"], -32600, "{r}");
        assert_eq!(r["error"]["message"], words);
    }
    assert!(!dir.path().join("p2").exists());
}

/// `fs/writeFile` with bad base64: -32600 in the reference's words.
#[test]
fn write_file_with_bad_base64() {
    let dir = tmp();
    let mut s = Server::started(&[]);
    let r = s.request(
        "fs/writeFile",
        json!({"path": p(&dir.path().join("x")), "dataBase64": "!!!"}),
    );
    assert_eq!(r["error"]["code"], -32600, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("fs/writeFile requires valid base64 dataBase64: "),
        "{r}"
    );
    assert!(!dir.path().join("x").exists());
}

/// `fs/readDirectory` answers at most 50,000 entries (the reference's
/// bound, which keeps the answer inside what its client decodes); past it,
/// -32603 in the reference's words.
#[test]
fn read_directory_stops_at_fifty_thousand_entries() {
    let dir = tmp();
    for i in 0..50_000 {
        std::fs::File::create(dir.path().join(format!("{i:05}"))).unwrap();
    }
    let mut s = Server::started(&[]);
    let r = s.call("fs/readDirectory", json!({"path": p(dir.path())}));
    assert_eq!(r["entries"].as_array().unwrap().len(), 50_000);
    std::fs::File::create(dir.path().join("one-more")).unwrap();
    let r = s.request("fs/readDirectory", json!({"path": p(dir.path())}));
    assert_eq!(r["error"]["code"], -32603, "{r}");
    assert_eq!(
        r["error"]["message"],
        "fs/readDirectory returned 50001 entries; limit is 50000"
    );
}
