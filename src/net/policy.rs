//! The proxy's policy: the `networkProxy` launch config, checked as the
//! reference checks it, and the decision for one destination (host
//! patterns, deny first; local and private destinations; the mode).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::wildcard::wildcard;

/// `process/start`'s `networkProxy`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchConfig {
    pub proxy: ProxyConfig,
    // `auditMetadata` (tags for the orchestrator's audit logs) is accepted
    // and ignored: never sent to the child, never logged.
    #[serde(default)]
    pub environment_id: Option<String>,
    #[serde(default)]
    pub execution_id: Option<String>,
    /// Present: allowlist misses are put to the client.
    #[serde(default)]
    pub policy_decision_timeout_ms: Option<u64>,
}

/// The proxy's policy as the orchestrator sends it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub enable_socks5: bool,
    #[serde(default)]
    pub enable_socks5_udp: bool,
    #[serde(default)]
    pub allow_upstream_proxy: bool,
    /// macOS only in the reference; accepted, and unix-socket requests
    /// are answered 501 here whatever it says.
    #[serde(default)]
    #[allow(dead_code)]
    pub dangerously_allow_all_unix_sockets: bool,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub domains: Option<BTreeMap<String, Rule>>,
    /// Checked (absolute paths), then answered 501 as above.
    #[serde(default)]
    pub unix_sockets: Option<BTreeMap<String, Rule>>,
    #[serde(default)]
    pub allow_local_binding: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Full,
    Limited,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Allow,
    Deny,
    None,
}

/// Why a destination is blocked; the wire names of the reference.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    Denied,
    NotAllowed,
    NotAllowedLocal,
    MethodNotAllowed,
    MitmRequired,
    UnixSocketUnsupported,
    /// A reason the client gave when it denied.
    Client(String),
}

impl Reason {
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Denied => "denied",
            Reason::NotAllowed => "not_allowed",
            Reason::NotAllowedLocal => "not_allowed_local",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::MitmRequired => "mitm_required",
            Reason::UnixSocketUnsupported => "unix_socket_unsupported",
            Reason::Client(reason) => reason,
        }
    }

    /// The `x-proxy-error` header and the message the child is told.
    pub fn explain(&self) -> (&'static str, &'static str) {
        match self {
            Reason::NotAllowed => ("blocked-by-allowlist", "Domain not in allowlist."),
            Reason::NotAllowedLocal => (
                "blocked-by-allowlist",
                "Sandbox policy blocks local/private network addresses.",
            ),
            Reason::Denied => (
                "blocked-by-denylist",
                "Domain denied by the sandbox policy.",
            ),
            Reason::MethodNotAllowed => (
                "blocked-by-method-policy",
                "Method not allowed in limited mode.",
            ),
            Reason::MitmRequired => (
                "blocked-by-mitm-required",
                "MITM required for limited HTTPS.",
            ),
            _ => ("blocked-by-policy", "Request blocked by network policy."),
        }
    }
}

/// A host pattern, after normalization.
#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    /// Exactly this host.
    Exact(String),
    /// `*.domain`: any subdomain, not the apex.
    Subdomains(String),
    /// `**.domain`: the apex and any subdomain.
    ApexAndSubdomains(String),
    /// `*`: every host (allow only).
    Any,
    /// Any other `*` or `?` glob over the whole host.
    Glob(String),
}

impl Pattern {
    fn parse(raw: &str) -> Result<Pattern> {
        let invalid = || config_error(format!("invalid glob pattern: {raw}"));
        let text = normalize_host(raw).ok_or_else(invalid)?;
        if text.chars().any(|c| "[]{}\\".contains(c)) {
            return Err(invalid());
        }
        Ok(if text == "*" || text == "**" {
            Pattern::Any
        } else if let Some(rest) = text.strip_prefix("**.").filter(|r| !has_glob(r)) {
            Pattern::ApexAndSubdomains(rest.to_string())
        } else if let Some(rest) = text.strip_prefix("*.").filter(|r| !has_glob(r)) {
            Pattern::Subdomains(rest.to_string())
        } else if has_glob(&text) {
            Pattern::Glob(text)
        } else {
            Pattern::Exact(text)
        })
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Pattern::Exact(h) => h == host,
            Pattern::Subdomains(d) => host
                .strip_suffix(d.as_str())
                .is_some_and(|p| p.len() > 1 && p.ends_with('.')),
            Pattern::ApexAndSubdomains(d) => {
                host == d
                    || host
                        .strip_suffix(d.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }
            Pattern::Any => true,
            Pattern::Glob(g) => wildcard(g.as_bytes(), host.as_bytes(), b'*', b'?'),
        }
    }
}

fn has_glob(text: &str) -> bool {
    text.contains(['*', '?'])
}

fn config_error(why: String) -> Error {
    Error::InvalidParams(format!("invalid network proxy config: {why}"))
}

/// Normalize a host as the reference does: trimmed, lower-case, one
/// trailing dot and IPv6 brackets removed, a `:port` removed when there is
/// exactly one colon, a `%25` zone written `%`. `None` when empty.
pub fn normalize_host(raw: &str) -> Option<String> {
    let mut host = raw.trim().to_ascii_lowercase();
    if host.starts_with('[') {
        let end = host.find(']')?;
        host = host[1..end].to_string();
    } else if host.matches(':').count() == 1 {
        host.truncate(host.find(':').unwrap_or(host.len()));
    }
    if let Some(stripped) = host.strip_suffix('.') {
        host = stripped.to_string();
    }
    host = host.replace("%25", "%");
    (!host.is_empty()).then_some(host)
}

/// The host as an IP address, zone id dropped.
fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host.split('%').next().unwrap_or(host);
    bare.parse().ok()
}

/// Whether `ip` is an address of the public internet (the reference's
/// list of non-public ranges).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80)
            }
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 192 && b == 0 && c == 2)
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 240)
}

/// The executor's own proxy, which the process's proxy forwards through
/// when `allowUpstreamProxy` is set (plain `http://` proxies only, from the
/// server's `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, minus `NO_PROXY`).
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    /// `host:port` for plain HTTP requests.
    pub http: Option<String>,
    /// `host:port` for tunnels (`CONNECT`, SOCKS5).
    pub tunnel: Option<String>,
    no_proxy: Vec<String>,
}

impl Upstream {
    /// From the server's environment; `None` when it names no proxy.
    pub fn from_env() -> Option<Upstream> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        // `http://[user@]host[:port][/]`: `host:port` (port 80 if none).
        let address = |value: String| -> Option<String> {
            if value.contains("://") && !value.starts_with("http://") {
                return None;
            }
            let rest = value.strip_prefix("http://").unwrap_or(&value);
            let auth = rest.split(['/', '?', '#']).next()?;
            let auth = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
            let has_port = auth.rsplit_once(':').is_some_and(|(h, p)| {
                !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (h.ends_with(']') || !h.contains(':'))
            });
            match (auth.is_empty(), has_port) {
                (true, _) => None,
                (false, true) => Some(auth.to_string()),
                (false, false) => Some(format!("{auth}:80")),
            }
        };
        let all = var(&["ALL_PROXY", "all_proxy"]);
        let http = var(&["HTTP_PROXY", "http_proxy"])
            .or_else(|| all.clone())
            .and_then(address);
        let tunnel = var(&["HTTPS_PROXY", "https_proxy"])
            .or(all)
            .and_then(address);
        let no_proxy = var(&["NO_PROXY", "no_proxy"])
            .map(|v| {
                v.split(',')
                    .filter_map(|e| {
                        normalize_host(e.trim().trim_start_matches("*.").trim_start_matches('.'))
                    })
                    .collect()
            })
            .unwrap_or_default();
        (http.is_some() || tunnel.is_some()).then_some(Upstream {
            http,
            tunnel,
            no_proxy,
        })
    }

    /// Whether `host` goes direct (`NO_PROXY`: `*`, the host, or a
    /// domain it is in).
    pub fn bypassed(&self, host: &str) -> bool {
        self.no_proxy.iter().any(|entry| {
            entry == "*"
                || host == entry
                || host
                    .strip_suffix(entry.as_str())
                    .is_some_and(|p| p.ends_with('.'))
        })
    }
}

/// The checked policy of one proxy.
#[derive(Debug)]
pub struct Policy {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
    pub mode: Mode,
    pub allow_local_binding: bool,
    /// The executor's proxy to forward through, when allowed and set.
    pub upstream: Option<Upstream>,
}

/// Where an allowed connection goes: the addresses to dial.
#[derive(Debug, Clone)]
pub struct Target {
    pub addrs: Vec<SocketAddr>,
}

/// How long a name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

impl Policy {
    /// Check the config in the reference's order (`callback_timeout` and
    /// the process id first, then the proxy).
    pub fn check(config: &LaunchConfig, process_id: &str) -> Result<Policy> {
        if let Some(timeout) = config.policy_decision_timeout_ms {
            if timeout == 0 {
                return Err(Error::InvalidParams(
                    "network policy decision callback timeout must be nonzero".into(),
                ));
            }
            if process_id.is_empty() || process_id.len() > 256 {
                return Err(Error::InvalidParams(
                    "callback-enabled process ID must be non-empty and at most 256 bytes".into(),
                ));
            }
        }
        let proxy = &config.proxy;
        if !proxy.enabled {
            return Err(config_error(
                "executor-local network proxy launch requires an enabled proxy".into(),
            ));
        }
        let mut allow = Vec::new();
        let mut deny = Vec::new();
        for (raw, rule) in proxy.domains.iter().flatten() {
            match rule {
                Rule::Deny => {
                    let pattern = Pattern::parse(raw)?;
                    if pattern == Pattern::Any {
                        return Err(config_error(format!(
                            "invalid value for network.denied_domains: {} (allowed exact hosts \
                             or scoped wildcards like *.example.com or **.example.com)",
                            raw.trim()
                        )));
                    }
                    deny.push(pattern);
                }
                Rule::Allow => allow.push(Pattern::parse(raw)?),
                Rule::None => {}
            }
        }
        let allowed_sockets = proxy
            .unix_sockets
            .iter()
            .flatten()
            .filter(|(_, rule)| **rule == Rule::Allow);
        for (i, (path, _)) in allowed_sockets.enumerate() {
            if !path.starts_with('/') {
                return Err(config_error(format!(
                    "invalid network.allow_unix_sockets[{i}]"
                )));
            }
        }
        Ok(Policy {
            allow,
            deny,
            mode: proxy.mode,
            allow_local_binding: proxy.allow_local_binding,
            upstream: if proxy.allow_upstream_proxy {
                Upstream::from_env()
            } else {
                None
            },
        })
    }

    /// The host policy for `host:port` (normalized host): where to
    /// connect, or why not. Names are resolved here, once, and the
    /// addresses checked are the ones dialed: a name can't resolve to a
    /// public address for the check and a private one for the connection.
    /// An allowlist miss comes with the target, for the client to allow.
    pub async fn decide(
        &self,
        host: &str,
        port: u16,
    ) -> std::result::Result<Target, (Reason, Option<Target>)> {
        let local = Err((Reason::NotAllowedLocal, None));
        if self.deny.iter().any(|p| matches_host(p, host)) {
            return Err((Reason::Denied, None));
        }
        let exact = |h: &str| {
            self.allow
                .iter()
                .any(|p| *p == Pattern::Exact(h.to_string()))
        };
        let literal = ip_literal(host);
        let addrs = match literal {
            Some(ip) => {
                if !self.allow_local_binding && !is_public(ip) && !exact(host) {
                    return local;
                }
                vec![SocketAddr::new(ip, port)]
            }
            None if host == "localhost" => {
                if !self.allow_local_binding && !exact(host) {
                    return local;
                }
                vec![
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
                ]
            }
            None => {
                let resolved =
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
                        .await;
                let addrs: Vec<SocketAddr> = match resolved {
                    Ok(Ok(addrs)) => addrs.collect(),
                    _ => Vec::new(),
                };
                // A name that does not resolve, or resolves to anything
                // local, is refused without local binding (even if
                // allowlisted: the name could be a rebinding one).
                if !self.allow_local_binding
                    && (addrs.is_empty() || addrs.iter().any(|a| !is_public(a.ip())))
                {
                    return local;
                }
                addrs
            }
        };
        // The server's own listeners are never a child's destination,
        // whatever the policy allows: they would run it unsandboxed.
        if addrs.iter().any(|a| crate::endpoints::is_own_tcp(*a)) {
            return Err((Reason::NotAllowedLocal, None));
        }
        if !self.allow.iter().any(|p| matches_host(p, host)) {
            return Err((Reason::NotAllowed, Some(Target { addrs })));
        }
        Ok(Target { addrs })
    }
}

/// A pattern against a host, also against an IP literal's zone-less form.
fn matches_host(pattern: &Pattern, host: &str) -> bool {
    pattern.matches(host)
        || (host.contains('%') && pattern.matches(host.split('%').next().unwrap_or(host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(domains: serde_json::Value, local: bool) -> Policy {
        let config: LaunchConfig = serde_json::from_value(serde_json::json!({
            "proxy": {"enabled": true, "mode": "full", "domains": domains, "allowLocalBinding": local}
        }))
        .unwrap();
        Policy::check(&config, "p").unwrap()
    }

    #[test]
    fn hosts_are_normalized() {
        for (raw, want) in [
            (" Example.COM. ", Some("example.com")),
            ("example.com:443", Some("example.com")),
            ("[::1]:8080", Some("::1")),
            ("::1", Some("::1")),
            ("fe80::1%25eth0", Some("fe80::1%eth0")),
            ("", None),
        ] {
            assert_eq!(normalize_host(raw).as_deref(), want, "{raw}");
        }
    }

    #[test]
    fn patterns_match_as_the_reference_says() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("example.com").matches("example.com"));
        assert!(!p("example.com").matches("a.example.com"));
        assert!(p("*.example.com").matches("a.example.com"));
        assert!(p("*.example.com").matches("a.b.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches("badexample.com"));
        assert!(p("**.example.com").matches("example.com"));
        assert!(p("**.example.com").matches("x.example.com"));
        assert!(!p("**.example.com").matches("xexample.com"));
        assert!(p("api-?.example.*").matches("api-1.example.org"));
        assert!(p("*").matches("anything"));
        assert!(Pattern::parse("a[b").is_err());
    }

    #[test]
    fn the_config_is_checked_in_the_references_order_with_its_texts() {
        let check = |v: serde_json::Value, id: &str| {
            let config: LaunchConfig = serde_json::from_value(v).unwrap();
            Policy::check(&config, id).unwrap_err().to_string()
        };
        assert_eq!(
            check(
                serde_json::json!({"proxy": {"enabled": true}, "policyDecisionTimeoutMs": 0}),
                "p"
            ),
            "network policy decision callback timeout must be nonzero"
        );
        assert_eq!(
            check(serde_json::json!({"proxy": {"enabled": false}}), "p"),
            "invalid network proxy config: executor-local network proxy launch requires an enabled proxy"
        );
        assert!(
            check(
                serde_json::json!({"proxy": {"enabled": true, "domains": {"*": "deny"}}}),
                "p"
            )
            .starts_with(
                "invalid network proxy config: invalid value for network.denied_domains: * "
            )
        );
        assert_eq!(
            check(
                serde_json::json!({"proxy": {"enabled": true, "unixSockets": {"rel/sock": "allow"}}}),
                "p"
            ),
            "invalid network proxy config: invalid network.allow_unix_sockets[0]"
        );
        assert_eq!(
            check(
                serde_json::json!({"proxy": {"enabled": true, "domains": {"a{b": "allow"}}}),
                "p"
            ),
            "invalid network proxy config: invalid glob pattern: a{b"
        );
    }

    #[test]
    fn no_proxy_entries_cover_their_domains() {
        let upstream = Upstream {
            http: None,
            tunnel: None,
            no_proxy: vec!["example.com".into(), "10.0.0.1".into()],
        };
        assert!(upstream.bypassed("example.com") && upstream.bypassed("a.example.com"));
        assert!(upstream.bypassed("10.0.0.1") && !upstream.bypassed("badexample.com"));
    }

    #[test]
    fn public_and_private_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "0.1.2.3",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn deny_wins_then_local_then_the_allowlist() {
        let p = policy(
            serde_json::json!({"**.example.com": "allow", "bad.example.com": "deny",
            "127.0.0.2": "allow", "*.local.test": "allow"}),
            false,
        );
        assert_eq!(
            p.decide("bad.example.com", 80).await.unwrap_err().0,
            Reason::Denied
        );
        assert_eq!(
            p.decide("127.0.0.3", 80).await.unwrap_err().0,
            Reason::NotAllowedLocal
        );
        assert_eq!(
            p.decide("localhost", 80).await.unwrap_err().0,
            Reason::NotAllowedLocal
        );
        // An exact entry lets a local literal through.
        assert_eq!(
            p.decide("127.0.0.2", 80).await.unwrap().addrs[0],
            "127.0.0.2:80".parse().unwrap()
        );
        assert_eq!(
            p.decide("1.1.1.1", 80).await.unwrap_err().0,
            Reason::NotAllowed
        );
        let open = policy(serde_json::json!({"*": "allow"}), true);
        assert!(open.decide("127.0.0.3", 80).await.is_ok());
        assert!(open.decide("localhost", 80).await.is_ok());
    }
}
