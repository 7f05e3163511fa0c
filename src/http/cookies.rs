//! The reference's one piece of cookie handling: for ChatGPT's hosts
//! (`chatgpt.com`, `chat.openai.com`, `chatgpt-staging.com` and their
//! subdomains where the reference has them) it keeps the Cloudflare
//! cookies those hosts set (load balancing and bot management) and sends
//! them back on later requests, from any connection. Nothing else is
//! stored: no other cookie of those hosts (a session cookie set beside
//! them), and nothing at all for any other host.
//!
//! What is kept: name, value, the host that set it or its `Domain`,
//! `Secure`, and the expiry (`Max-Age`, else `Expires`). `Path` is not
//! kept (these cookies are set for `/`). Cookies set on a redirect hop
//! the HTTP client follows by itself are not seen; those of the final
//! response are.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderValue, SET_COOKIE};

use crate::sync::lock;

/// The cookies kept: Cloudflare's.
const NAMES: &[&str] = &["__cf_bm", "__cflb", "__cfruid", "_cfuvid", "cf_clearance"];

/// At most this many are held (the oldest go first).
const MAX_COOKIES: usize = 64;

/// Longest value kept.
const MAX_VALUE: usize = 4096;

struct Cookie {
    name: String,
    value: String,
    /// The setting host (host-only) or the `Domain` it covers.
    scope: String,
    host_only: bool,
    secure: bool,
    expires: Option<SystemTime>,
}

static STORE: Mutex<Vec<Cookie>> = Mutex::new(Vec::new());

/// A host whose Cloudflare cookies are kept.
fn kept_for(host: &str) -> bool {
    matches!(
        host,
        "chatgpt.com" | "chat.openai.com" | "chatgpt-staging.com"
    ) || host.ends_with(".chatgpt.com")
        || host.ends_with(".chatgpt-staging.com")
}

fn host_of(url: &Url) -> Option<String> {
    url.host_str()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
}

fn domain_matches(host: &str, domain: &str) -> bool {
    host == domain
        || host
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// The `Cookie` header for a request to `url`, if any is kept for it.
pub fn header_for(url: &Url) -> Option<HeaderValue> {
    let host = host_of(url)?;
    if !kept_for(&host) {
        return None;
    }
    let now = SystemTime::now();
    let secure = url.scheme() == "https";
    let mut store = lock(&STORE);
    store.retain(|c| c.expires.is_none_or(|t| t > now));
    let pairs: Vec<String> = store
        .iter()
        .filter(|c| {
            (secure || !c.secure)
                && if c.host_only {
                    c.scope == host
                } else {
                    domain_matches(&host, &c.scope)
                }
        })
        .map(|c| format!("{}={}", c.name, c.value))
        .collect();
    drop(store);
    if pairs.is_empty() {
        return None;
    }
    HeaderValue::from_str(&pairs.join("; ")).ok()
}

/// Keep what a response from `url` set, of the cookies kept.
pub fn remember(url: &Url, headers: &HeaderMap) {
    let Some(host) = host_of(url) else {
        return;
    };
    if !kept_for(&host) {
        return;
    }
    for value in headers.get_all(SET_COOKIE) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        if let Some(cookie) = parse(text, &host) {
            store(cookie);
        }
    }
}

fn store(cookie: Cookie) {
    let mut store = lock(&STORE);
    store.retain(|c| {
        !(c.name == cookie.name && c.scope == cookie.scope && c.host_only == cookie.host_only)
    });
    let now = SystemTime::now();
    if cookie.expires.is_some_and(|t| t <= now) {
        // Expired on arrival: how a server deletes one.
        return;
    }
    if store.len() >= MAX_COOKIES {
        store.remove(0);
    }
    store.push(cookie);
}

/// One `Set-Cookie` value, if it is a kept cookie `host` may set.
fn parse(text: &str, host: &str) -> Option<Cookie> {
    let mut parts = text.split(';');
    let (name, value) = parts.next()?.split_once('=')?;
    let (name, value) = (name.trim(), value.trim());
    if !NAMES.contains(&name) || value.len() > MAX_VALUE {
        return None;
    }
    if value
        .bytes()
        .any(|b| b.is_ascii_control() || b == b';' || b == b' ' || b == b',' || b >= 0x80)
    {
        return None;
    }
    let mut cookie = Cookie {
        name: name.to_string(),
        value: value.to_string(),
        scope: host.to_string(),
        host_only: true,
        secure: false,
        expires: None,
    };
    let mut max_age = None;
    let mut expires = None;
    for attribute in parts {
        let (key, val) = match attribute.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (attribute.trim(), ""),
        };
        match key.to_ascii_lowercase().as_str() {
            "domain" => {
                let domain = val.trim_start_matches('.').to_ascii_lowercase();
                // A host sets cookies for itself or a domain above it,
                // and only one whose cookies are kept.
                if domain.is_empty() || !domain_matches(host, &domain) || !kept_for(&domain) {
                    return None;
                }
                cookie.scope = domain;
                cookie.host_only = false;
            }
            "secure" => cookie.secure = true,
            "max-age" => max_age = val.parse::<i64>().ok(),
            "expires" => expires = http_date(val),
            _ => {}
        }
    }
    cookie.expires = match max_age {
        Some(secs) if secs <= 0 => Some(SystemTime::UNIX_EPOCH),
        Some(secs) => SystemTime::now().checked_add(Duration::from_secs(secs as u64)),
        None => expires,
    };
    Some(cookie)
}

/// `Thu, 03 Dec 2026 18:30:00 GMT` (and its `03-Dec-2026` variant).
fn http_date(text: &str) -> Option<SystemTime> {
    let text = text.split_once(',').map_or(text, |(_, rest)| rest).trim();
    let fields: Vec<&str> = text.split([' ', '-']).filter(|f| !f.is_empty()).collect();
    let [day, month, year, time, ..] = fields.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ]
    .iter()
    .position(|m| month.to_ascii_lowercase().starts_with(m))? as u64
        + 1;
    let mut year: u64 = year.parse().ok()?;
    if year < 100 {
        year += if year < 70 { 2000 } else { 1900 };
    }
    let mut hms = time.split(':').map(|n| n.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days since the epoch (the civil-from-days inverse, March-based).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era_days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * mo + 2) / 5 + day - 1;
    let days = era_days.checked_sub(719_468)?;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_to_the_right_second() {
        let t = http_date("Thu, 01 Jan 1970 00:00:10 GMT").unwrap();
        assert_eq!(t, SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        let t = http_date("Thu, 03 Dec 2026 18:30:00 GMT").unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, 1_796_322_600);
        assert_eq!(
            http_date("Sat, 29-Feb-2020 00:00:00 GMT"),
            http_date("Sat, 29 Feb 2020 00:00:00 GMT")
        );
        assert!(http_date("soon").is_none());
    }

    #[test]
    fn only_kept_names_from_kept_hosts_for_domains_they_cover() {
        assert!(parse("__cf_bm=a; Path=/; Domain=.chatgpt.com", "api.chatgpt.com").is_some());
        assert!(parse("session=a; Path=/", "chatgpt.com").is_none());
        // A host can't set a cookie for a domain it is not under, nor for
        // one whose cookies are not kept.
        assert!(parse("__cf_bm=a; Domain=chat.openai.com", "chatgpt.com").is_none());
        assert!(parse("__cf_bm=a; Domain=openai.com", "chat.openai.com").is_none());
        assert!(parse("__cf_bm=a b", "chatgpt.com").is_none());
        assert!(!kept_for("evilchatgpt.com"));
        assert!(!kept_for("chatgpt.com.evil.net"));
        assert!(!kept_for("api.chat.openai.com"));
        assert!(!domain_matches("xchatgpt.com", "chatgpt.com"));
    }
}
