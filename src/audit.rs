//! The audit log (`--audit-log`): one JSON line per event, for the people
//! who run the executor to know afterwards what ran, what it touched and
//! what the network policy decided.
//!
//! Every line has `seq` (from 1, one counter per server process, taken
//! when the event happens: a gap is an event that was dropped), `time`
//! (RFC 3339, UTC) and `event`; the rest depends on the event. Events are
//! handed to a writer thread through a bounded queue and never wait for
//! it: when the queue is full, or the log can't be written (a full disk),
//! the event is counted, and a `dropped` line with the count is written as
//! soon as a line can be written again.
//!
//! No secret is written: variables are named, never valued; a URL is
//! reduced to its host; arguments that look like credentials
//! (`Authorization:`, `--token=…`, `password=…`, a URL's user or query) are
//! replaced by `<redacted>` ([`redact_arg`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// Events that may wait for the writer before more are dropped.
const QUEUE: usize = 8192;

/// How often what was written is synced to disk.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A file, appended to (made with mode 0600), rotated by size.
    File(PathBuf),
    /// A Unix stream socket: each line is written to it (reconnected when
    /// it drops).
    Unix(PathBuf),
    /// The server's stderr.
    Stderr,
}

impl Target {
    /// `stderr`, `unix:PATH`, or a file's path.
    pub fn parse(text: &str) -> Result<Target, String> {
        if text == "stderr" || text == "-" {
            return Ok(Target::Stderr);
        }
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if text.is_empty() {
            return Err("the audit log needs a path, unix:PATH or stderr".into());
        }
        Ok(Target::File(PathBuf::from(text)))
    }
}

/// The server's audit log.
pub struct Audit {
    queue: SyncSender<Item>,
    next_seq: AtomicU64,
    /// Events not handed to the writer (the queue was full).
    dropped: std::sync::Arc<AtomicU64>,
}

/// What the writer is handed.
enum Item {
    Event(u64, String, Map<String, Value>),
    /// Write what came before, sync, then say so.
    Flush(SyncSender<()>),
}

static AUDIT: OnceLock<Audit> = OnceLock::new();

/// Lines written, and events dropped, since start (`server/status`).
static WRITTEN: AtomicU64 = AtomicU64::new(0);
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// `{written, dropped}` since start, when the log is on.
pub fn counts() -> Option<Value> {
    enabled().then(|| {
        json!({
            "written": WRITTEN.load(Ordering::Relaxed),
            "dropped": DROPPED_TOTAL.load(Ordering::Relaxed),
        })
    })
}

/// Start the audit log (once per process): opens `target` now, so that a
/// path that can't be written is an error at start.
pub fn start(target: Target, max_bytes: Option<u64>) -> std::io::Result<()> {
    let sink = Sink::open(target, max_bytes)?;
    let (tx, rx) = sync_channel(QUEUE);
    let dropped = std::sync::Arc::new(AtomicU64::new(0));
    let writer_dropped = dropped.clone();
    std::thread::Builder::new()
        .name("audit-log".into())
        .spawn(move || write_loop(sink, rx, writer_dropped))?;
    let _ = AUDIT.set(Audit {
        queue: tx,
        next_seq: AtomicU64::new(1),
        dropped,
    });
    Ok(())
}

/// Whether the audit log is on (callers skip building events when not).
pub fn enabled() -> bool {
    AUDIT.get().is_some()
}

/// Record `event` with the fields `fields` makes (an object), if the log
/// is on: with it off, they are never made.
pub fn record(event: &str, fields: impl FnOnce() -> Value) {
    let Some(audit) = AUDIT.get() else {
        return;
    };
    let seq = audit.next_seq.fetch_add(1, Ordering::Relaxed);
    let fields = match fields() {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    match audit
        .queue
        .try_send(Item::Event(seq, event.to_string(), fields))
    {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            audit.dropped.fetch_add(1, Ordering::Relaxed);
            DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Wait (up to `wait`) until everything recorded so far is written and
/// synced: at the server's exit.
pub fn flush(wait: Duration) {
    let Some(audit) = AUDIT.get() else {
        return;
    };
    let (tx, rx) = sync_channel(1);
    let deadline = Instant::now() + wait;
    let mut item = Item::Flush(tx);
    // The queue may be full: retry until there is room or time is up.
    loop {
        match audit.queue.try_send(item) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                item = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// The writer: lines out as they come, a `dropped` line first whenever
/// events were lost, a sync on a timer.
fn write_loop(mut sink: Sink, rx: Receiver<Item>, dropped: std::sync::Arc<AtomicU64>) {
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    let mut last_complaint: Option<Instant> = None;
    loop {
        let next = match rx.recv_timeout(SYNC_EVERY) {
            Ok(Item::Flush(done)) => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let line = render(0, "dropped", &count_fields(lost));
                    if sink.write(&line).is_err() {
                        dropped.fetch_add(lost, Ordering::Relaxed);
                    }
                }
                let _ = sink.sync();
                unsynced = false;
                let _ = done.try_send(());
                continue;
            }
            Ok(Item::Event(seq, event, fields)) => Ok((seq, event, fields)),
            Err(err) => Err(err),
        };
        if let Ok((seq, event, fields)) = &next {
            let lost = dropped.swap(0, Ordering::Relaxed);
            let mut ok = true;
            if lost > 0 {
                let line = render(0, "dropped", &count_fields(lost));
                ok = sink.write(&line).is_ok();
                if !ok {
                    dropped.fetch_add(lost, Ordering::Relaxed);
                }
            }
            let line = render(*seq, event, fields);
            if ok {
                match sink.write(&line) {
                    Ok(()) => {
                        unsynced = true;
                        WRITTEN.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        ok = false;
                        if last_complaint.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::error!(
                                "the audit log can't be written ({err}); counting what is dropped"
                            );
                            last_complaint = Some(Instant::now());
                        }
                    }
                }
            }
            if !ok {
                dropped.fetch_add(1, Ordering::Relaxed);
                DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = next {
            let _ = sink.sync();
            return;
        }
        if unsynced && last_sync.elapsed() >= SYNC_EVERY {
            let _ = sink.sync();
            unsynced = false;
            last_sync = Instant::now();
        }
        if next.is_err() {
            // Quiet: say what was dropped, if anything, now.
            let lost = dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let line = render(0, "dropped", &count_fields(lost));
                if sink.write(&line).is_err() {
                    dropped.fetch_add(lost, Ordering::Relaxed);
                }
            }
        }
    }
}

fn count_fields(count: u64) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("count".into(), json!(count));
    fields
}

/// One line: `seq` (0 for the writer's own `dropped` lines, which are not
/// events of their own), `time`, `event`, then the fields.
fn render(seq: u64, event: &str, fields: &Map<String, Value>) -> Vec<u8> {
    let mut line = Map::new();
    if seq > 0 {
        line.insert("seq".into(), json!(seq));
    }
    line.insert("time".into(), json!(crate::sys::rfc3339_now()));
    line.insert("event".into(), json!(event));
    for (k, v) in fields {
        line.insert(k.clone(), v.clone());
    }
    let mut out = serde_json::to_vec(&Value::Object(line)).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Where lines go.
enum Sink {
    File {
        path: PathBuf,
        file: std::fs::File,
        size: u64,
        /// Rotate when the file would pass this (half of
        /// `--audit-log-max-bytes`: the file and its one predecessor
        /// together stay within the maximum).
        rotate_at: Option<u64>,
    },
    Unix {
        path: PathBuf,
        stream: Option<std::os::unix::net::UnixStream>,
    },
    Stderr,
}

impl Sink {
    fn open(target: Target, max_bytes: Option<u64>) -> std::io::Result<Sink> {
        Ok(match target {
            Target::File(path) => {
                let file = open_append(&path)?;
                let size = file.metadata()?.len();
                Sink::File {
                    path,
                    file,
                    size,
                    rotate_at: max_bytes.map(|m| (m / 2).max(1)),
                }
            }
            Target::Unix(path) => {
                let stream = std::os::unix::net::UnixStream::connect(&path)?;
                Sink::Unix {
                    path,
                    stream: Some(stream),
                }
            }
            Target::Stderr => Sink::Stderr,
        })
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File {
                path,
                file,
                size,
                rotate_at,
            } => {
                if let Some(limit) = *rotate_at {
                    if *size > 0 && *size + line.len() as u64 > limit {
                        let _ = file.sync_all();
                        let mut old = path.clone().into_os_string();
                        old.push(".1");
                        std::fs::rename(&*path, &old)?;
                        *file = open_append(path)?;
                        *size = 0;
                    }
                    if line.len() as u64 > limit {
                        // A line that could never fit is not written.
                        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
                    }
                }
                if let Err(err) = file.write_all(line) {
                    // No torn line: what part of it was written goes.
                    let _ = file.set_len(*size);
                    return Err(err);
                }
                *size += line.len() as u64;
                Ok(())
            }
            Sink::Unix { path, stream } => {
                if stream.is_none() {
                    *stream = Some(std::os::unix::net::UnixStream::connect(&*path)?);
                }
                let result = stream.as_mut().map(|s| s.write_all(line));
                match result {
                    Some(Ok(())) => Ok(()),
                    Some(Err(err)) => {
                        *stream = None;
                        Err(err)
                    }
                    None => Ok(()),
                }
            }
            Sink::Stderr => std::io::stderr().lock().write_all(line),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File { file, .. } => file.sync_data(),
            _ => Ok(()),
        }
    }
}

/// The log file, appended to: never through a link, and a regular file
/// only if it is ours with one name (a device such as `/dev/null` is
/// taken as it is; a FIFO is refused: `unix:PATH` is for a collector).
fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let refuse = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("refusing {}: {why}", path.display()),
        )
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        return Err(refuse("it is a FIFO (use unix:PATH for a log collector)"));
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refuse("it is a symbolic link")
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    // SAFETY: a getter without failure modes.
    let ours = unsafe { libc::geteuid() };
    if meta.file_type().is_file() {
        if meta.uid() != ours {
            return Err(refuse(&format!(
                "it belongs to uid {}, not to us",
                meta.uid()
            )));
        }
        if meta.nlink() > 1 {
            return Err(refuse("it has other names (a hard link)"));
        }
    } else if !meta.file_type().is_char_device() {
        return Err(refuse("not a regular file or a device"));
    }
    Ok(file)
}

/// What a request will log once its answer is known: the fields taken
/// from its params now (before the handler consumes them).
pub struct RequestNote {
    method: String,
    session: String,
    /// The event a success logs, and its fields; `None`: a success logs
    /// nothing (only refusals of this method are logged).
    on_success: Option<&'static str>,
    fields: Map<String, Value>,
}

/// The note of a request, when the log is on.
pub fn note_request(method: &str, params: &Value, session: &str) -> Option<RequestNote> {
    if !enabled() {
        return None;
    }
    let text = |key: &str| params.get(key).and_then(Value::as_str).map(str::to_string);
    let mut fields = Map::new();
    let on_success = match method {
        "fs/writeFile" => {
            fields.insert("path".into(), json!(text("path")));
            let b64 = params
                .get("dataBase64")
                .and_then(Value::as_str)
                .unwrap_or("");
            let padding = b64.bytes().rev().take_while(|&b| b == b'=').count();
            fields.insert(
                "bytes".into(),
                json!((b64.len() / 4 * 3).saturating_sub(padding)),
            );
            Some("fs.write")
        }
        "fs/remove" => {
            fields.insert("path".into(), json!(text("path")));
            Some("fs.remove")
        }
        "fs/createDirectory" => {
            fields.insert("path".into(), json!(text("path")));
            Some("fs.createDirectory")
        }
        "fs/rename" | "fs/copy" => {
            fields.insert("path".into(), json!(text("sourcePath")));
            fields.insert("toPath".into(), json!(text("destinationPath")));
            Some(if method == "fs/rename" {
                "fs.rename"
            } else {
                "fs.copy"
            })
        }
        "http/request" => {
            fields.insert(
                "method".into(),
                json!(text("method").unwrap_or_else(|| "GET".into())),
            );
            fields.insert("host".into(), json!(text("url").map(|u| url_host(&u))));
            Some("http.request")
        }
        _ => None,
    };
    Some(RequestNote {
        method: method.to_string(),
        session: session.to_string(),
        on_success,
        fields,
    })
}

impl RequestNote {
    /// Log the request's outcome: its event on success (with the HTTP
    /// status from `result`), `refused` with the error's code and text on
    /// failure.
    pub fn finish(mut self, outcome: Result<Option<&Value>, &crate::error::Error>) {
        self.fields.insert("session".into(), json!(self.session));
        match outcome {
            Ok(result) => {
                let Some(event) = self.on_success else {
                    return;
                };
                if event == "http.request" {
                    let status = result.and_then(|r| r.get("status")).cloned();
                    self.fields
                        .insert("status".into(), status.unwrap_or(Value::Null));
                }
                record(event, move || Value::Object(self.fields));
            }
            Err(error) => {
                self.fields.insert("request".into(), json!(self.method));
                self.fields.insert("code".into(), json!(error.code()));
                let mut message = redact_message(&error.to_string());
                if message.len() > 300 {
                    let mut cut = 300;
                    while !message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    message.truncate(cut);
                }
                self.fields.insert("message".into(), json!(message));
                record("refused", move || Value::Object(self.fields));
            }
        }
    }
}

/// Words that, in an argument, are followed by a credential.
const SECRET_WORDS: &[&str] = &[
    "authorization",
    "bearer",
    "token",
    "password",
    "passwd",
    "secret",
    "apikey",
    "api_key",
    "api-key",
    "credential",
    "cookie",
    "private",
];

/// An argument as the log shows it: a URL without its user and query, and
/// anything after a credential word (`Authorization: …`, `--token=…`,
/// `PASSWORD=…`) replaced.
pub fn redact_arg(arg: &str) -> String {
    let lower = arg.to_ascii_lowercase();
    for word in SECRET_WORDS {
        if let Some(at) = lower.find(word) {
            let end = at + word.len();
            // Keep the word and what separates it from its value.
            let rest = &arg[end..];
            let sep = rest
                .char_indices()
                .find(|(_, c)| !matches!(c, ':' | '=' | ' ' | '"' | '\''))
                .map_or(rest.len(), |(i, _)| i);
            if sep > 0 && end + sep < arg.len() {
                return format!("{}<redacted>", &arg[..end + sep]);
            }
        }
    }
    if let Some(scheme_end) = arg.find("://") {
        let after = &arg[scheme_end + 3..];
        let host_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let authority = &after[..host_end];
        let host = authority.rsplit('@').next().unwrap_or(authority);
        let path_end = after[host_end..]
            .find(['?', '#'])
            .map_or(after.len(), |i| host_end + i);
        let mut out = format!(
            "{}{}{}",
            &arg[..scheme_end + 3],
            host,
            &after[host_end..path_end]
        );
        if authority.contains('@') || path_end < after.len() {
            out.push_str("<redacted>");
        }
        return out;
    }
    arg.to_string()
}

/// A command line as the log shows it: each argument through
/// [`redact_arg`], and the argument after a credential flag (`--token X`,
/// `-p X` is not guessed at) replaced.
pub fn redact_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut next_is_secret = false;
    for arg in argv {
        if next_is_secret {
            out.push("<redacted>".to_string());
            next_is_secret = false;
            continue;
        }
        let lower = arg.to_ascii_lowercase();
        next_is_secret = lower.starts_with('-')
            && !lower.contains('=')
            && SECRET_WORDS.iter().any(|w| lower.contains(w));
        out.push(redact_arg(arg));
    }
    out
}

/// An error's text as the log shows it: what it quotes of the request
/// (`"…"`, as serde quotes a value) is dropped, and then it goes through
/// [`redact_arg`] (a credential word, a URL's user and query).
pub fn redact_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"<redacted>");
            }
            quoted = !quoted;
            if !quoted {
                out.push('"');
            }
            continue;
        }
        if !quoted {
            out.push(c);
        }
    }
    redact_arg(&out)
}

/// The host of a URL (no user, port kept, no path or query).
pub fn url_host(url: &str) -> String {
    let after = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
    authority
        .rsplit('@')
        .next()
        .unwrap_or(authority)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_arguments_are_redacted() {
        assert_eq!(redact_arg("ls"), "ls");
        assert_eq!(
            redact_arg("Authorization: Bearer abc123"),
            "Authorization: <redacted>"
        );
        assert_eq!(redact_arg("--token=abc123"), "--token=<redacted>");
        assert_eq!(redact_arg("DB_PASSWORD=hunter2"), "DB_PASSWORD=<redacted>");
        assert_eq!(
            redact_arg("https://user:pw@example.com/a/b?key=abc#x"),
            "https://example.com/a/b<redacted>"
        );
        assert_eq!(redact_arg("https://example.com/a"), "https://example.com/a");
        assert_eq!(redact_arg("tokenize.py"), "tokenize.py");
        assert_eq!(
            redact_message(r#"invalid type: string "s3cret", expected u64 at `pids`"#),
            r#"invalid type: string "<redacted>", expected u64 at `pids`"#
        );
        assert_eq!(
            redact_message("error sending request for url (http://h:1/x?token=abc)"),
            "error sending request for url (http://h:1/x?token=<redacted>"
        );
        let argv: Vec<String> = [
            "curl",
            "--api-key",
            "abc",
            "-H",
            "Authorization: Bearer x",
            "f",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            redact_argv(&argv),
            [
                "curl",
                "--api-key",
                "<redacted>",
                "-H",
                "Authorization: <redacted>",
                "f"
            ]
        );
        assert_eq!(
            url_host("https://u:p@example.com:8443/x?y"),
            "example.com:8443"
        );
        assert_eq!(
            Target::parse("unix:/run/a.sock"),
            Ok(Target::Unix("/run/a.sock".into()))
        );
        assert_eq!(Target::parse("stderr"), Ok(Target::Stderr));
    }
}
