//! Golden transcripts: every `fixtures/transcripts/*.jsonl` is played
//! against the built binary over real pipes (stdio), and again over a Unix
//! socket (`--listen unix:PATH`), over WebSocket (`--listen ws://`),
//! through a `--stdio --persist` bridge to a daemon, and over a Noise
//! stream through a relay to a `--remote` executor (`exec-server bridge
//! noise+http://…`), with the same expectations.
//!
//! # Format
//!
//! One JSON object per line; blank lines and lines starting with `#` are
//! comments. Steps:
//!
//! - `{"args": [..]}`: extra server flags (first step only).
//! - `{"notOver": [VIA, ..], "because": TEXT}`: transports the
//!   transcript does not play over (`noise`: a Noise stream's record layer
//!   carries JSON messages and binary frames only, so no line that is not
//!   JSON).
//! - `{"requires": [TOOL, ..]}`: programs the transcript runs; without
//!   them it is skipped with a notice (mandatory when
//!   `EXEC_SERVER_TEST_REQUIRE` names them, as in CI).
//! - `{"send": VALUE}`: the client writes VALUE as one compact line.
//! - `{"sendRaw": "TEXT"}`: the client writes TEXT as a line, verbatim.
//! - `{"expect": PATTERN}`: the next server line matches PATTERN.
//! - `{"expectUnordered": [PATTERN, ..]}`: the next lines match these
//!   patterns in any order (notifications racing a response).
//! - `{"expectOutput": {"processId": P, "stream": S, "text": TEXT}}`: the
//!   next lines are `process/output` notifications of P on S, with
//!   consecutive seqs, whose chunks together are exactly TEXT. A program may
//!   write one message in several `write`s, and the server may read them as
//!   one chunk or several; this step does not care how it was split. With
//!   `"saveSeq": NAME` the last seq is remembered as NAME.
//! - `{"sleepMs": N}`: pause.
//!
//! Patterns are JSON where objects must have the same keys and these strings
//! are wildcards: `"$any"`, `"$int"`, `"$string"`, `"$bool"`, `"$uuid"`,
//! `"$absent"` (the key must be missing), `"$any?"` (anything, or
//! missing), `"$b64:TEXT"` (base64 of TEXT),
//! `"$save:NAME"` (anything; remembered), `"$var:NAME"` (equal to the
//! remembered value; also substituted inside `send`, where
//! `"$var:NAME/REST"` appends REST to a remembered string, in a pattern
//! too). `tmp` (and `tmpUri`, as a `file:` URI) is a fresh empty
//! directory of the play's own. `web` is
//! remembered from the start: `http://127.0.0.1:PORT` of a test web server
//! (routes in `web.rs`).
//!
//! After the last step no unexpected line may be pending; then closing
//! stdin must make a stdio server (or a bridge) exit with status 0, and a
//! socket server must exit with status 0 on SIGTERM once its connection is
//! closed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Server, TIMEOUT, unb64};

#[test]
fn golden_transcripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/transcripts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures/transcripts exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 25,
        "expected at least 25 transcripts, found {}",
        files.len()
    );
    // Transcripts are independent; run a few at a time, each over every
    // transport.
    let plays: Vec<(&PathBuf, Via)> = files
        .iter()
        .flat_map(|f| {
            [
                (f, Via::Stdio),
                (f, Via::Unix),
                (f, Via::Ws),
                (f, Via::Persist),
                (f, Via::Noise),
            ]
        })
        // EXEC_SERVER_TRANSCRIPT_VIA=noise (say) plays over one transport.
        .filter(|(_, via)| {
            std::env::var("EXEC_SERVER_TRANSCRIPT_VIA")
                .map_or(true, |only| format!("{via:?}").eq_ignore_ascii_case(&only))
        })
        .collect();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = plays
            .chunks(plays.len().div_ceil(4))
            .map(|group| {
                scope.spawn(move || {
                    group
                        .iter()
                        .filter_map(|(f, via)| run(f, *via).err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} transcript plays failed:\n\n{}",
        failures.len(),
        plays.len(),
        failures.join("\n\n")
    );
}

/// How a transcript reaches the server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Stdio,
    Unix,
    Ws,
    /// Through a `--stdio --persist` bridge to a daemon.
    Persist,
    /// Through `exec-server bridge noise+http://…`, a relay, and a
    /// `--remote` executor.
    Noise,
}

struct Run {
    name: String,
    history: Vec<String>,
    vars: HashMap<String, Value>,
}

impl Run {
    /// The next server line, which must match `pattern` (saving into
    /// `vars`).
    fn expect(&mut self, server: &mut Server, line: usize, pattern: &Value) -> Result<(), String> {
        let Some(actual) = server.recv_line(TIMEOUT) else {
            return Err(self.fail(line, format!("timed out waiting for\n      {pattern}")));
        };
        self.history.push(format!("< {actual}"));
        if let Err(at) = matches(pattern, &actual, "$", &mut self.vars) {
            return Err(self.fail(
                line,
                format!("mismatch at {at}\n    expected: {pattern}\n    actual:   {actual}"),
            ));
        }
        Ok(())
    }

    fn fail(&self, line: usize, what: String) -> String {
        let mut out = format!(
            "--- {} (line {line}): {what}\n    exchange so far:\n",
            self.name
        );
        for h in self
            .history
            .iter()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let _ = writeln!(out, "      {h}");
        }
        out
    }
}

fn run(path: &Path, via: Via) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut steps: Vec<(usize, Value)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let step: Value = serde_json::from_str(trimmed)
            .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
        steps.push((i + 1, step));
    }
    let args: Vec<String> = steps
        .first()
        .and_then(|(_, s)| s.get("args"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let name = format!("{via:?}").to_ascii_lowercase();
    let skipped = steps.iter().any(|(_, s)| {
        s.get("notOver")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(&name)))
    });
    if skipped {
        return Ok(());
    }
    // `{"requires": [TOOL, ..]}` steps: programs the transcript runs.
    for (_, step) in &steps {
        for tool in step
            .get("requires")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tool = tool.as_str().unwrap_or_default();
            let present = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            let why = format!("{} needs {tool}", path.display());
            if !crate::support::available(tool, present, &why) {
                return Ok(());
            }
        }
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = match via {
        Via::Stdio => Server::start(&arg_refs),
        Via::Unix => Server::start_unix(&arg_refs),
        Via::Ws => Server::start_ws(&arg_refs),
        Via::Persist => Server::start_persist(&arg_refs),
        Via::Noise => Server::start_noise(&arg_refs),
    };
    // A fresh directory per play: plays of one transcript may overlap.
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut run = Run {
        name: format!(
            "{} over {via:?}",
            path.file_name().unwrap().to_string_lossy()
        ),
        history: Vec::new(),
        vars: HashMap::from([
            ("web".to_string(), Value::String(web_base())),
            (
                "tmp".to_string(),
                Value::String(tmp.path().display().to_string()),
            ),
            (
                "tmpUri".to_string(),
                Value::String(format!("file://{}", tmp.path().display())),
            ),
        ]),
    };

    for (line, step) in &steps {
        let line = *line;
        if step.get("args").is_some()
            || step.get("requires").is_some()
            || step.get("notOver").is_some()
        {
            continue;
        } else if let Some(value) = step.get("send") {
            let value = substitute(value, &run.vars);
            run.history.push(format!("> {value}"));
            server.send(&value);
        } else if let Some(raw) = step.get("sendRaw").and_then(Value::as_str) {
            run.history.push(format!("> {}", shorten(raw)));
            server.send_raw(raw);
        } else if let Some(ms) = step.get("sleepMs").and_then(Value::as_u64) {
            std::thread::sleep(Duration::from_millis(ms));
        } else if let Some(pattern) = step.get("expect") {
            run.expect(&mut server, line, pattern)?;
        } else if let Some(patterns) = step.get("expectUnordered").and_then(Value::as_array) {
            let mut left: Vec<&Value> = patterns.iter().collect();
            while !left.is_empty() {
                let Some(actual) = server.recv_line(TIMEOUT) else {
                    let want: Vec<String> = left.iter().map(|p| p.to_string()).collect();
                    return Err(run.fail(
                        line,
                        format!(
                            "timed out waiting for any of\n      {}",
                            want.join("\n      ")
                        ),
                    ));
                };
                run.history.push(format!("< {actual}"));
                let hit = left.iter().position(|p| {
                    let mut scratch = run.vars.clone();
                    matches(p, &actual, "$", &mut scratch).is_ok()
                });
                match hit {
                    Some(i) => {
                        let p = left.remove(i);
                        let _ = matches(p, &actual, "$", &mut run.vars);
                    }
                    None => {
                        let want: Vec<String> = left.iter().map(|p| p.to_string()).collect();
                        return Err(run.fail(
                            line,
                            format!(
                                "unexpected line\n    actual: {actual}\n    none of:\n      {}",
                                want.join("\n      ")
                            ),
                        ));
                    }
                }
            }
        } else if let Some(want) = step.get("expectOutput") {
            expect_output(&mut server, &mut run, line, want)?;
        } else {
            return Err(run.fail(line, format!("unknown step {step}")));
        }
    }

    // Nothing unexpected may be pending.
    if let Some(extra) = server.recv_line(Duration::from_millis(200)) {
        run.history.push(format!("< {extra}"));
        return Err(run.fail(
            steps.last().map_or(0, |s| s.0),
            format!("unexpected extra line {extra}"),
        ));
    }
    server.close_stdin();
    if via == Via::Unix || via == Via::Ws {
        // A socket server outlives its connections: it ends on a signal.
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match server.child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => {
                return Err(run.fail(0, format!("server exited with {status} after stdin closed")));
            }
            _ if Instant::now() > deadline => {
                return Err(run.fail(0, "server did not exit after stdin closed".into()));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    // Over Noise the server proper is the executor: it ends on a signal,
    // as a socket server does.
    if let Some(executor) = server.remote.as_mut().and_then(|r| r.executor.as_mut()) {
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(executor.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match executor.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => {
                    return Err(
                        run.fail(0, format!("the executor exited with {status} on SIGTERM"))
                    );
                }
                _ if Instant::now() > deadline => {
                    return Err(run.fail(0, "the executor did not exit on SIGTERM".into()));
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    Ok(())
}

/// The `expectOutput` step: read output notifications until they add up to
/// the expected text.
fn expect_output(
    server: &mut Server,
    run: &mut Run,
    line: usize,
    want: &Value,
) -> Result<(), String> {
    let text = want["text"].as_str().unwrap_or_default().as_bytes();
    let pattern = serde_json::json!({
        "jsonrpc": "2.0",
        "method": "process/output",
        "params": {
            "processId": want["processId"],
            "seq": "$save:expectOutput.seq",
            "stream": want["stream"],
            "chunk": "$save:expectOutput.chunk",
        },
    });
    let mut got = Vec::new();
    let mut last_seq: Option<u64> = None;
    while got.len() < text.len() || got.is_empty() {
        run.expect(server, line, &pattern)?;
        let seq = run.vars["expectOutput.seq"].as_u64().unwrap_or(0);
        if last_seq.is_some_and(|last| seq != last + 1) {
            return Err(run.fail(line, format!("seq {seq} does not follow {last_seq:?}")));
        }
        last_seq = Some(seq);
        got.extend(unb64(&run.vars["expectOutput.chunk"]));
    }
    if got != text {
        return Err(run.fail(
            line,
            format!(
                "output differs\n    expected: {:?}\n    actual:   {:?}",
                String::from_utf8_lossy(text),
                String::from_utf8_lossy(&got)
            ),
        ));
    }
    if let (Some(name), Some(seq)) = (want.get("saveSeq").and_then(Value::as_str), last_seq) {
        run.vars.insert(name.to_string(), seq.into());
    }
    Ok(())
}

fn shorten(text: &str) -> String {
    if text.len() > 120 {
        format!("{}... ({} bytes)", &text[..100], text.len())
    } else {
        text.to_string()
    }
}

/// `http://127.0.0.1:PORT` of a test web server shared by every
/// transcript (`$var:web/PATH` in a `send`).
fn web_base() -> String {
    static WEB: std::sync::OnceLock<crate::web::Web> = std::sync::OnceLock::new();
    WEB.get_or_init(|| crate::web::Web::start("127.0.0.1"))
        .url("")
}

fn substitute(value: &Value, vars: &HashMap<String, Value>) -> Value {
    match value {
        Value::String(s) => match s.strip_prefix("$var:") {
            // `$var:NAME/REST`: a remembered string with REST appended.
            Some(name) if name.contains('/') => {
                let (name, rest) = name.split_at(name.find('/').unwrap_or(0));
                match vars.get(name) {
                    Some(Value::String(base)) => Value::String(format!("{base}{rest}")),
                    _ => Value::Null,
                }
            }
            Some(name) => vars.get(name).cloned().unwrap_or(Value::Null),
            None => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| substitute(v, vars)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Match `actual` against `pattern`; on mismatch, the path where it failed.
fn matches(
    pattern: &Value,
    actual: &Value,
    at: &str,
    vars: &mut HashMap<String, Value>,
) -> Result<(), String> {
    let fail = || Err(at.to_string());
    match pattern {
        Value::String(p) if p.starts_with('$') => {
            let ok = match p.as_str() {
                "$any" | "$any?" => true,
                "$int" => actual.is_i64() || actual.is_u64(),
                "$string" => actual.is_string(),
                "$bool" => actual.is_boolean(),
                "$uuid" => actual.as_str().is_some_and(is_uuid),
                _ if p.starts_with("$b64:") => {
                    actual.is_string()
                        && std::panic::catch_unwind(|| unb64(actual)).ok().as_deref()
                            == Some(&p.as_bytes()[5..])
                }
                _ if p.starts_with("$save:") => {
                    vars.insert(p[6..].to_string(), actual.clone());
                    true
                }
                _ if p.starts_with("$var:") => &substitute(pattern, vars) == actual,
                _ => pattern == actual,
            };
            if ok { Ok(()) } else { fail() }
        }
        Value::Object(p) => {
            let Value::Object(a) = actual else {
                return fail();
            };
            for (key, pv) in p {
                match a.get(key) {
                    None if pv == "$absent" || pv == "$any?" => {}
                    None => return Err(format!("{at}.{key} (missing)")),
                    Some(_) if pv == "$absent" => {
                        return Err(format!("{at}.{key} (should be absent)"));
                    }
                    Some(av) => matches(pv, av, &format!("{at}.{key}"), vars)?,
                }
            }
            if let Some(extra) = a.keys().find(|k| !p.contains_key(*k)) {
                return Err(format!("{at}.{extra} (unexpected member)"));
            }
            Ok(())
        }
        Value::Array(p) => {
            let Value::Array(a) = actual else {
                return fail();
            };
            if p.len() != a.len() {
                return Err(format!("{at} (length {} instead of {})", a.len(), p.len()));
            }
            for (i, (pv, av)) in p.iter().zip(a).enumerate() {
                matches(pv, av, &format!("{at}[{i}]"), vars)?;
            }
            Ok(())
        }
        _ => {
            if pattern == actual {
                Ok(())
            } else {
                fail()
            }
        }
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}
