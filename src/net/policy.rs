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
        let trimmed = raw.trim();
        if trimmed.chars().any(|c| "[]{}\\".contains(c)) && !trimmed.starts_with('[') {
            return Err(invalid());
        }
        // The host part in the canonical form hosts are matched in; a
        // glob other than a leading `*.`/`**.` is matched as written
        // (lower case).
        let text = if trimmed == "*" || trimmed == "**" {
            trimmed.to_string()
        } else if let Some(rest) = trimmed.strip_prefix("**.").filter(|r| !has_glob(r)) {
            format!("**.{}", normalize_host(rest).ok_or_else(invalid)?)
        } else if let Some(rest) = trimmed.strip_prefix("*.").filter(|r| !has_glob(r)) {
            format!("*.{}", normalize_host(rest).ok_or_else(invalid)?)
        } else if has_glob(trimmed) {
            let lower = trimmed.to_lowercase();
            lower.strip_suffix('.').unwrap_or(&lower).to_string()
        } else {
            normalize_host(trimmed).ok_or_else(invalid)?
        };
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

/// A host in the one canonical form every policy match uses, whatever
/// spelling the child chose: trimmed; a `:port` removed when there is
/// exactly one colon; IPv6 brackets and a zone id (`%eth0`, `%25eth0`)
/// removed; IPv4 in any base and any number of parts (`0177.0.0.1`,
/// `0x7f.1`, `127.1`, `2130706433`) as its dotted quad; IPv6 in its
/// shortest form, and an IPv4-mapped one as the IPv4 address; names
/// through UTS 46 (lower case, full-width letters, digits and dots folded,
/// IDN labels in `xn--` form) with one trailing dot removed. `None` for
/// what is no host at all (forbidden characters, a bad IDN label, an
/// address that does not parse): the proxy answers 400.
pub fn normalize_host(raw: &str) -> Option<String> {
    let mut host = raw.trim().to_string();
    // Full-width and ideographic forms of `[`, `]`, `:` and `%` would
    // otherwise survive to the name parser.
    host = host
        .chars()
        .map(|c| match c {
            '\u{FF3B}' => '[',
            '\u{FF3D}' => ']',
            '\u{FF1A}' => ':',
            '\u{FF05}' => '%',
            c => c,
        })
        .collect();
    if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']')?;
        if !rest[end + 1..].is_empty() && !rest[end + 1..].starts_with(':') {
            return None;
        }
        host = rest[..end].to_string();
    } else if host.matches(':').count() == 1 {
        host.truncate(host.find(':').unwrap_or(host.len()));
    }
    if host.is_empty() {
        return None;
    }
    if host.contains(':') {
        // IPv6, with a zone id dropped.
        let bare = host.split('%').next().unwrap_or(&host);
        let ip: std::net::Ipv6Addr = bare.parse().ok()?;
        return Some(IpAddr::V6(ip).to_canonical().to_string());
    }
    if host.contains('%') {
        // A percent sign is never part of a name or an IPv4 address.
        return None;
    }
    match url::Host::parse(&host).ok()? {
        url::Host::Ipv4(v4) => Some(v4.to_string()),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6).to_canonical().to_string()),
        url::Host::Domain(name) => {
            let name = name.strip_suffix('.').unwrap_or(&name).to_string();
            (!name.is_empty() && !name.ends_with('.')).then_some(name)
        }
    }
}

/// The host as an IP address (already canonical).
fn ip_literal(host: &str) -> Option<IpAddr> {
    host.parse().ok()
}

/// Whether `ip` is an address of the public internet (the reference's
/// list of non-public ranges).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => {
                let seg = v6.segments();
                let first = seg[0];
                // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::/96,
                // 64:ff9b:1::/48) addresses carry an IPv4 one: judged as
                // that, never as public on their own.
                let embedded = Ipv4Addr::new(
                    (seg[6] >> 8) as u8,
                    seg[6] as u8,
                    (seg[7] >> 8) as u8,
                    seg[7] as u8,
                );
                if seg[..6] == [0; 6] || (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]) {
                    return seg[..6] != [0; 6] && is_public_v4(embedded);
                }
                if seg[..3] == [0x64, 0xff9b, 1] {
                    return false;
                }
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

    /// The whole decision with the resolver given (what the gate does
    /// when nobody is asked): the name judged first, without any lookup;
    /// only a name the policy allows is resolved.
    #[cfg(test)]
    pub async fn decide_via<F, Fut>(
        &self,
        host: &str,
        port: u16,
        lookup: F,
    ) -> std::result::Result<Target, Reason>
    where
        F: FnOnce(String, u16) -> Fut,
        Fut: std::future::Future<Output = Vec<SocketAddr>>,
    {
        self.judge_name(host)?;
        self.resolve(host, port, lookup).await
    }

    /// What the policy says of the name alone, before anything is looked
    /// up: deny patterns, then (for an address or `localhost`) the local
    /// rule, then the allowlist (`NotAllowed`: a miss the client may be
    /// asked about).
    pub fn judge_name(&self, host: &str) -> std::result::Result<(), Reason> {
        if self.deny.iter().any(|p| p.matches(host)) {
            return Err(Reason::Denied);
        }
        let local = match ip_literal(host) {
            Some(ip) => !is_public(ip),
            None => is_localhost(host),
        };
        if local && !self.allow_local_binding && !self.allowed_exactly(host) {
            return Err(Reason::NotAllowedLocal);
        }
        if !self.allow.iter().any(|p| p.matches(host)) {
            return Err(Reason::NotAllowed);
        }
        Ok(())
    }

    /// The addresses to dial for a name the policy allows (or the client
    /// allowed), each judged again as the address it is: deny patterns
    /// match the address dialed as well as the name; anything local is
    /// refused without local binding (even when the name was allowlisted:
    /// it could be a rebinding one), and the server's own listeners
    /// always are. Names are resolved here, once, and exactly the
    /// addresses checked are dialed.
    pub async fn resolve<F, Fut>(
        &self,
        host: &str,
        port: u16,
        lookup: F,
    ) -> std::result::Result<Target, Reason>
    where
        F: FnOnce(String, u16) -> Fut,
        Fut: std::future::Future<Output = Vec<SocketAddr>>,
    {
        let literal = ip_literal(host);
        let addrs: Vec<SocketAddr> = match literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None if is_localhost(host) => vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
            ],
            None => lookup(host.to_string(), port)
                .await
                .into_iter()
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect(),
        };
        if addrs.is_empty() && !self.allow_local_binding {
            // Nothing to dial: refused as the reference words a name that
            // does not resolve (with local binding, the dial fails: 502).
            return Err(Reason::NotAllowedLocal);
        }
        for addr in &addrs {
            let ip = addr.ip().to_string();
            if self.deny.iter().any(|p| p.matches(&ip)) {
                return Err(Reason::Denied);
            }
            if crate::endpoints::is_own_tcp(*addr) {
                // The server's own listeners are never a child's
                // destination: they would run it unsandboxed.
                return Err(Reason::NotAllowedLocal);
            }
        }
        let local_ok = self.allow_local_binding
            || ((literal.is_some() || is_localhost(host)) && self.allowed_exactly(host));
        if !local_ok && addrs.iter().any(|a| !is_public(a.ip())) {
            return Err(Reason::NotAllowedLocal);
        }
        Ok(Target { addrs })
    }

    /// An `allow` entry names exactly this host (what lets a local
    /// literal, or `localhost`, through without local binding).
    fn allowed_exactly(&self, host: &str) -> bool {
        self.allow
            .iter()
            .any(|p| *p == Pattern::Exact(host.to_string()))
    }

    /// [`Policy::resolve`] with the system's resolver.
    pub async fn resolve_system(
        &self,
        host: &str,
        port: u16,
    ) -> std::result::Result<Target, Reason> {
        self.resolve(host, port, system_lookup).await
    }
}

/// `localhost` and names below it (which resolve to loopback).
fn is_localhost(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// The system's resolver, given [`RESOLVE_TIMEOUT`].
async fn system_lookup(host: String, port: u16) -> Vec<SocketAddr> {
    match tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        _ => Vec::new(),
    }
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
            ("fe80::1%25eth0", Some("fe80::1")),
            ("[fe80::1%eth0]:80", Some("fe80::1")),
            ("B\u{fc}cher.example", Some("xn--bcher-kva.example")),
            (
                "\u{ff25}\u{ff38}\u{ff21}\u{ff2d}\u{ff30}\u{ff2c}\u{ff25}\u{3002}com",
                Some("example.com"),
            ),
            ("", None),
            ("a b", None),
            ("a%41", None),
            ("[::1]x", None),
        ] {
            assert_eq!(normalize_host(raw).as_deref(), want, "{raw:?}");
        }
    }

    /// Every way of writing 127.0.0.1 this generator knows: one to four
    /// parts, each in decimal, octal or hex (any case, extra zeros), with
    /// and without a trailing dot, in full-width digits and ideographic
    /// dots, and as IPv4-mapped IPv6 in several forms.
    pub(crate) fn spellings_of_loopback() -> Vec<String> {
        let value: u32 = 0x7f00_0001;
        let forms = |n: u32| {
            vec![
                n.to_string(),
                format!("0{n:o}"),
                format!("00{n:o}"),
                format!("0x{n:x}"),
                format!("0X{n:X}"),
                format!("0x00{n:x}"),
            ]
        };
        let mut out = Vec::new();
        // Parts: a.b.c.d, a.b.cd (16 bits), a.bcd (24 bits), abcd (32).
        let splits: [Vec<u32>; 4] = [
            vec![127, 0, 0, 1],
            vec![127, 0, 1],
            vec![127, 1],
            vec![value],
        ];
        for parts in &splits {
            let per: Vec<Vec<String>> = parts.iter().map(|&p| forms(p)).collect();
            // Each part in each form, the others plain, and all parts in
            // the same form.
            for (i, choices) in per.iter().enumerate() {
                for choice in choices {
                    let mut words: Vec<String> = parts.iter().map(u32::to_string).collect();
                    words[i] = choice.clone();
                    out.push(words.join("."));
                }
            }
            for f in 0..per[0].len() {
                out.push(
                    per.iter()
                        .map(|c| c[f].clone())
                        .collect::<Vec<_>>()
                        .join("."),
                );
            }
        }
        let plain: Vec<String> = out.clone();
        for p in &plain {
            out.push(format!("{p}."));
            out.push(format!("{p}:8080"));
        }
        let full_width = |t: &str| -> String {
            t.chars()
                .map(|c| match c {
                    '0'..='9' => char::from_u32(c as u32 - '0' as u32 + 0xFF10).unwrap(),
                    '.' => '\u{3002}',
                    c => c,
                })
                .collect()
        };
        out.push(full_width("127.0.0.1"));
        out.push(full_width("127.1"));
        out.push("127\u{FF0E}0\u{FF0E}0\u{FF0E}1".into());
        out.push("127\u{FF61}0\u{FF61}0\u{FF61}1".into());
        out.extend(v6_forms(&[
            "::ffff:127.0.0.1",
            "::FFFF:127.0.0.1",
            "::ffff:7f00:1",
            "0:0:0:0:0:ffff:7f00:1",
            "0000:0000:0000:0000:0000:ffff:7f00:0001",
            "::ffff:7f00:0001",
            "0::ffff:127.0.0.1",
        ]));
        out
    }

    /// Each IPv6 text bare, bracketed, with a port, and with a zone id
    /// (escaped and not).
    fn v6_forms(texts: &[&str]) -> Vec<String> {
        texts
            .iter()
            .flat_map(|v6| {
                [
                    v6.to_string(),
                    format!("[{v6}]"),
                    format!("[{v6}]:443"),
                    format!("[{v6}%25eth0]"),
                    format!("{v6}%lo"),
                ]
            })
            .collect()
    }

    /// Every way of writing ::1 this generator knows.
    pub(crate) fn spellings_of_v6_loopback() -> Vec<String> {
        v6_forms(&[
            "::1",
            "::0:1",
            "0::1",
            "::0001",
            "0:0:0:0:0:0:0:1",
            "0000:0000:0000:0000:0000:0000:0000:0001",
            "0:0::0:1",
            "::0.0.0.1",
        ])
    }

    #[test]
    fn every_spelling_of_an_address_is_the_one_canonical_form() {
        let v4 = spellings_of_loopback();
        assert!(v4.len() > 150, "{}", v4.len());
        for raw in &v4 {
            assert_eq!(normalize_host(raw).as_deref(), Some("127.0.0.1"), "{raw:?}");
        }
        for raw in spellings_of_v6_loopback() {
            assert_eq!(normalize_host(&raw).as_deref(), Some("::1"), "{raw:?}");
        }
    }

    #[tokio::test]
    async fn deny_rules_hold_for_every_spelling_and_for_the_address_dialed() {
        let p = policy(
            serde_json::json!({"*": "allow", "127.0.0.1": "deny", "[::1]": "deny",
                "10.9.8.7": "deny"}),
            true,
        );
        for raw in spellings_of_loopback()
            .into_iter()
            .chain(spellings_of_v6_loopback())
        {
            let host = normalize_host(&raw).unwrap();
            assert_eq!(p.judge_name(&host), Err(Reason::Denied), "{raw:?}");
        }
        // A name the child chose that resolves to a denied address.
        let to = |ip: &'static str| {
            move |_: String, port: u16| async move { vec![SocketAddr::new(ip.parse().unwrap(), port)] }
        };
        assert_eq!(
            p.decide_via("innocent.example", 80, to("10.9.8.7"))
                .await
                .unwrap_err(),
            Reason::Denied
        );
        assert_eq!(
            p.decide_via("innocent.example", 80, to("::ffff:127.0.0.1"))
                .await
                .unwrap_err(),
            Reason::Denied
        );
        assert!(
            p.decide_via("innocent.example", 80, to("10.9.8.6"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn local_rules_hold_for_every_spelling() {
        let p = policy(serde_json::json!({"*": "allow"}), false);
        for raw in spellings_of_loopback()
            .into_iter()
            .chain(spellings_of_v6_loopback())
        {
            let host = normalize_host(&raw).unwrap();
            assert_eq!(p.judge_name(&host), Err(Reason::NotAllowedLocal), "{raw:?}");
        }
        for local in ["localhost", "a.localhost"] {
            assert_eq!(p.judge_name(local), Err(Reason::NotAllowedLocal));
        }
    }

    #[tokio::test]
    async fn no_name_the_policy_refuses_is_ever_looked_up() {
        use std::sync::{Arc, Mutex};
        let p = policy(
            serde_json::json!({"*.example.com": "allow", "evil.example.com": "deny"}),
            false,
        );
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let lookup = |asked: Arc<Mutex<Vec<String>>>| {
            move |host: String, port: u16| {
                asked.lock().unwrap().push(host);
                async move { vec![SocketAddr::new("93.184.216.34".parse().unwrap(), port)] }
            }
        };
        for raw in [
            "secret-data.attacker.test",
            "c2VjcmV0.exfil.invalid",
            "evil.example.com",
            "EVIL.Example.COM.",
            "\u{ff45}vil.example.com",
            "example.com",
            "example.com.attacker.test",
        ] {
            let host = normalize_host(raw).unwrap();
            assert!(
                p.decide_via(&host, 443, lookup(asked.clone()))
                    .await
                    .is_err(),
                "{raw}"
            );
        }
        assert!(
            asked.lock().unwrap().is_empty(),
            "looked up: {:?}",
            asked.lock().unwrap()
        );
        // An allowed name is looked up, once (the test can fail).
        assert!(
            p.decide_via("ok.example.com", 443, lookup(asked.clone()))
                .await
                .is_ok()
        );
        assert_eq!(*asked.lock().unwrap(), ["ok.example.com"]);
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
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "255.255.255.255",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::101:101",
        ] {
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
        let none = |_: String, _: u16| async { Vec::new() };
        assert_eq!(
            p.decide_via("bad.example.com", 80, none).await.unwrap_err(),
            Reason::Denied
        );
        assert_eq!(
            p.decide_via("127.0.0.3", 80, none).await.unwrap_err(),
            Reason::NotAllowedLocal
        );
        assert_eq!(
            p.decide_via("localhost", 80, none).await.unwrap_err(),
            Reason::NotAllowedLocal
        );
        // An exact entry lets a local literal through.
        assert_eq!(
            p.decide_via("127.0.0.2", 80, none).await.unwrap().addrs[0],
            "127.0.0.2:80".parse().unwrap()
        );
        assert_eq!(
            p.decide_via("1.1.1.1", 80, none).await.unwrap_err(),
            Reason::NotAllowed
        );
        let open = policy(serde_json::json!({"*": "allow"}), true);
        assert!(open.decide_via("127.0.0.3", 80, none).await.is_ok());
        assert!(open.decide_via("localhost", 80, none).await.is_ok());
    }
}
