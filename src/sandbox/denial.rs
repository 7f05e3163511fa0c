//! The `sandboxDenied` rule: was a sandboxed process's failure probably
//! the sandbox's doing?

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the server knows about a sandboxed process, for `sandboxDenied`.
#[derive(Debug)]
pub struct Watch {
    /// Set when the seccomp filter refused a call (known for sure).
    pub refused: Arc<AtomicBool>,
    pub network_restricted: bool,
    /// The program's file name, for tool-specific exit codes.
    pub program: String,
}

/// Output that suggests the sandbox stopped the command (the Codex
/// heuristic, plus EXDEV's text: Landlock refuses a link or rename that
/// would widen access with it), lower-case.
const DENIAL_WORDS: &[&str] = &[
    "invalid cross-device link",
    "operation not permitted",
    "permission denied",
    "read-only file system",
    "seccomp",
    "sandbox",
    "landlock",
    "failed to write file",
];

/// The `sandboxDenied` rule: was a sandboxed process's failure probably the
/// sandbox's doing? Never true for an unsandboxed process or exit 0.
pub fn probably_denied(
    watch: Option<&Watch>,
    exit_code: i32,
    output: impl FnOnce() -> String,
) -> bool {
    let Some(watch) = watch else {
        return false;
    };
    if exit_code == 0 {
        return false;
    }
    if watch.refused.load(Ordering::SeqCst) {
        return true;
    }
    let text = output();
    if DENIAL_WORDS.iter().any(|w| text.contains(w)) {
        return true;
    }
    if watch.network_restricted {
        // Could not resolve / could not connect: curl 6 and 7, wget 4.
        let network_failure = match watch.program.as_str() {
            "curl" => matches!(exit_code, 6 | 7),
            "wget" => exit_code == 4,
            _ => false,
        };
        if network_failure {
            return true;
        }
    }
    match exit_code {
        2 | 126 | 127 => false,
        159 => true,
        _ => false,
    }
}
