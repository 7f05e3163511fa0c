//! Sandbox intent on `process/start` (PROTOCOL.md section 6).
//!
//! Kernel enforcement is not built yet, so this layer accepts only intents
//! that need no enforcement and refuses every other one with
//! `sandboxUnavailable`: the server never runs a command with less
//! protection than was asked.

use serde_json::Value;

use crate::error::{Error, Result};

/// Decide how a process would be sandboxed; the `sandboxType` of the result.
pub fn check(sandbox: Option<&Value>) -> Result<&'static str> {
    let Some(sandbox) = sandbox.filter(|v| !v.is_null()) else {
        return Ok("none");
    };
    let permissions = sandbox
        .get("permissions")
        .ok_or_else(|| Error::InvalidParams("sandbox.permissions is required".into()))?;
    let kind = permissions
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidParams("sandbox.permissions.type is required".into()))?;
    match kind {
        "disabled" | "external" => Ok("none"),
        "managed" => {
            let fs_kind = permissions
                .pointer("/file_system/type")
                .and_then(Value::as_str)
                .unwrap_or("restricted");
            let network = permissions
                .get("network")
                .and_then(Value::as_str)
                .unwrap_or("restricted");
            if fs_kind == "unrestricted" && network == "enabled" {
                Ok("none")
            } else {
                Err(Error::SandboxUnavailable(
                    "kernel sandbox enforcement is not available in this build".into(),
                ))
            }
        }
        other => Err(Error::InvalidParams(format!(
            "unknown sandbox permissions type {other}"
        ))),
    }
}
