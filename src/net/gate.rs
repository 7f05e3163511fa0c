//! The gate every connection through a process's proxy passes: the mode
//! guard, the host policy, the client's answer for an allowlist miss
//! (`network/policyRequest`), and an audit record of the decision
//! (`network/policyDecision`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::policy::{Mode, Policy, Reason, Target};
use crate::protocol::method;
use crate::transport::{Outbound, Outgoing};

/// The connection a session is attached to now, if any.
pub type Peer = Arc<dyn Fn() -> Option<Outbound> + Send + Sync>;

/// Added to the client's decision budget for the round trip.
const TRANSPORT_MARGIN: Duration = Duration::from_secs(5);
/// Audit records are dropped rather than queued when the connection has
/// less room than this: they must never hold up output.
const AUDIT_ROOM: usize = 8;
const MAX_REASON_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protocol {
    Http,
    HttpsConnect,
    Socks5Tcp,
    Socks5Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::HttpsConnect => "https_connect",
            Protocol::Socks5Tcp => "socks5_tcp",
            Protocol::Socks5Udp => "socks5_udp",
        }
    }
}

/// One connection (or datagram) the child asks for.
pub struct Ask<'a> {
    pub protocol: Protocol,
    pub host: &'a str,
    pub port: u16,
    pub method: Option<&'a str>,
    pub client: Option<SocketAddr>,
}

/// A process's gate.
pub struct Gate {
    pub policy: Policy,
    process_id: String,
    /// `Some`: allowlist misses are put to the client, with this budget.
    callback: Option<Duration>,
    peer: Peer,
    /// Becomes true when the process is terminated or closed: questions
    /// still waiting are answered deny.
    stopped: watch::Receiver<bool>,
}

/// Who decided, for the audit record.
#[derive(Clone, Copy)]
enum Source {
    Baseline,
    ModeGuard,
    ProxyState,
    Decider,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Baseline => "baseline_policy",
            Source::ModeGuard => "mode_guard",
            Source::ProxyState => "proxy_state",
            Source::Decider => "decider",
        }
    }
}

impl Gate {
    pub fn new(
        policy: Policy,
        process_id: &str,
        callback: Option<Duration>,
        peer: Peer,
        stopped: watch::Receiver<bool>,
    ) -> Gate {
        Gate {
            policy,
            process_id: process_id.to_string(),
            callback,
            peer,
            stopped,
        }
    }

    /// Decide `ask`: where to connect, or why not. Every final decision
    /// is reported to the client.
    pub async fn check(&self, ask: &Ask<'_>) -> Result<Target, Reason> {
        let limited = self.policy.mode == Mode::Limited;
        // SOCKS in limited mode: only 443 gets as far as the host policy
        // (and then needs MITM); anything else is refused first.
        if limited
            && ((ask.protocol == Protocol::Socks5Tcp && ask.port != 443)
                || ask.protocol == Protocol::Socks5Udp)
        {
            return self.blocked(ask, Reason::MethodNotAllowed, Source::ModeGuard);
        }
        // The name is judged before anything is looked up: a name the
        // policy refuses is never resolved (its labels could carry data).
        let (source, overridden) = match self.policy.judge_name(ask.host) {
            Ok(()) => (Source::Baseline, false),
            Err(Reason::NotAllowed) if self.callback.is_some() => {
                match self.ask_client(ask).await {
                    Verdict::Allow => (Source::Decider, true),
                    Verdict::Deny(reason) => return self.blocked(ask, reason, Source::Decider),
                    Verdict::Ask(reason) => {
                        self.audit(ask, "ask", Source::Decider, reason.as_str(), false, true);
                        return Err(reason);
                    }
                }
            }
            Err(reason) => return self.blocked(ask, reason, Source::Baseline),
        };
        let target = match self.policy.resolve_system(ask.host, ask.port).await {
            Ok(target) => target,
            Err(reason) => return self.blocked(ask, reason, Source::Baseline),
        };
        if limited {
            let guard = match ask.protocol {
                Protocol::Http => {
                    let read_only = matches!(ask.method, Some("GET" | "HEAD" | "OPTIONS"));
                    (!read_only).then_some(Reason::MethodNotAllowed)
                }
                _ => Some(Reason::MitmRequired),
            };
            if let Some(reason) = guard {
                return self.blocked(ask, reason, Source::ModeGuard);
            }
        }
        let reason = if overridden { "not_allowed" } else { "allow" };
        self.audit(ask, "allow", source, reason, overridden, true);
        Ok(target)
    }

    /// A refusal that is not about the host (unix sockets, bad requests).
    pub fn refuse_state(&self, ask: &Ask<'_>, reason: Reason) -> Reason {
        self.audit(
            ask,
            "deny",
            Source::ProxyState,
            reason.as_str(),
            false,
            false,
        );
        reason
    }

    fn blocked(&self, ask: &Ask<'_>, reason: Reason, source: Source) -> Result<Target, Reason> {
        let domain = matches!(source, Source::Baseline | Source::Decider);
        self.audit(ask, "deny", source, reason.as_str(), false, domain);
        Err(reason)
    }

    /// `network/policyRequest`: the client's decision for an allowlist
    /// miss. Anything but a well-formed answer in time is a deny.
    async fn ask_client(&self, ask: &Ask<'_>) -> Verdict {
        let deny = Verdict::Deny(Reason::NotAllowed);
        let Some(budget) = self.callback else {
            return deny;
        };
        let host_ok = (1..=253).contains(&ask.host.len())
            && !ask
                .host
                .chars()
                .any(|c| c.is_control() || c.is_whitespace());
        if !host_ok || *self.stopped.borrow() {
            return deny;
        }
        let Some(outbound) = (self.peer)() else {
            return deny;
        };
        let params = json!({
            "processId": self.process_id,
            "request": {"protocol": ask.protocol.as_str(), "host": ask.host, "port": ask.port},
        });
        let mut stopped = self.stopped.clone();
        let answer = tokio::select! {
            answer = outbound.call(method::NETWORK_POLICY_REQUEST, params, budget + TRANSPORT_MARGIN) => answer,
            _ = stopped.wait_for(|s| *s) => return deny,
        };
        match answer {
            Ok(result) => verdict(&result).unwrap_or(deny),
            Err(why) => {
                tracing::debug!(process = %self.process_id, "policy question denied: {why}");
                deny
            }
        }
    }

    /// `network/policyDecision`, best effort.
    fn audit(
        &self,
        ask: &Ask<'_>,
        decision: &str,
        source: Source,
        reason: &str,
        overridden: bool,
        domain: bool,
    ) {
        tracing::debug!(
            process = %self.process_id,
            protocol = ask.protocol.as_str(),
            port = ask.port,
            decision,
            reason,
            "network policy decision"
        );
        crate::audit::record("network.decision", || {
            json!({
                "processId": self.process_id,
                "protocol": ask.protocol.as_str(),
                "host": ask.host,
                "port": ask.port,
                "decision": decision,
                "source": source.as_str(),
                "rule": reason,
            })
        });
        let Some(outbound) = (self.peer)() else {
            return;
        };
        let mut params = json!({
            "processId": self.process_id,
            "timestamp": crate::sys::rfc3339_now(),
            "scope": if domain { "domain" } else { "non_domain" },
            "decision": decision,
            "source": source.as_str(),
            "reason": reason,
            "protocol": ask.protocol.as_str(),
            "host": ask.host,
            "port": ask.port,
            "policyOverride": overridden,
        });
        if let Some(m) = ask.method {
            params["method"] = Value::from(m);
        }
        if let Some(c) = ask.client {
            params["client"] = Value::from(c.to_string());
        }
        outbound.send_if_room(
            Outgoing::Notification {
                method: method::NETWORK_POLICY_DECISION,
                params,
            },
            AUDIT_ROOM,
        );
    }
}

enum Verdict {
    Allow,
    Deny(Reason),
    Ask(Reason),
}

/// The client's `{decision: {type, reason}}`; `None` when malformed.
fn verdict(result: &Value) -> Option<Verdict> {
    let decision = result.get("decision")?;
    let reason = || -> Option<Reason> {
        let text = decision.get("reason").and_then(Value::as_str).unwrap_or("");
        if text.len() > MAX_REASON_BYTES || text.chars().any(char::is_control) {
            return None;
        }
        Some(match text {
            "" => Reason::Client("policy_denied".into()),
            "not_allowed" => Reason::NotAllowed,
            other => Reason::Client(other.to_string()),
        })
    };
    match decision.get("type")?.as_str()? {
        "allow" => Some(Verdict::Allow),
        "deny" => reason().map(Verdict::Deny),
        "ask" => reason().map(Verdict::Ask),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_verdicts_are_read_strictly() {
        let v = |j: Value| verdict(&j);
        assert!(matches!(
            v(json!({"decision": {"type": "allow"}})),
            Some(Verdict::Allow)
        ));
        assert!(matches!(
            v(json!({"decision": {"type": "deny", "reason": ""}})),
            Some(Verdict::Deny(Reason::Client(r))) if r == "policy_denied"
        ));
        assert!(matches!(
            v(json!({"decision": {"type": "ask", "reason": "not_allowed"}})),
            Some(Verdict::Ask(Reason::NotAllowed))
        ));
        assert!(v(json!({"decision": {"type": "deny", "reason": "a\nb"}})).is_none());
        assert!(v(json!({"decision": {"type": "deny", "reason": "x".repeat(1025)}})).is_none());
        assert!(v(json!({"decision": {"type": "maybe"}})).is_none());
        assert!(v(json!({})).is_none());
    }
}
