//! Network control for processes (`docs/PROTOCOL.md` section 10): the
//! executor-local policy proxy a `process/start` can ask for
//! (`networkProxy`), and what managed networking enforces for a sandboxed
//! command (the sandbox's network namespace, bridged to the proxy ports
//! only).
//!
//! - `policy`: the launch config, checked, and the host policy.
//! - `gate`: one decision per connection: mode guard, host policy, the
//!   client's answer (`network/policyRequest`), the audit record.
//! - `proxy`: the HTTP and SOCKS5 proxies and the UDP relay.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::error::{Error, Result};

pub mod gate;
pub mod policy;
mod proxy;

use gate::Gate;
pub use gate::Peer;
use policy::{LaunchConfig, Policy};

/// Whether `process/start` honours `networkProxy` (the
/// `networkProxyLaunch` capability).
pub const PROXY_LAUNCH: bool = true;

/// `process/start`'s `managedNetwork`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedNetwork {
    #[serde(default)]
    pub loopback_ports: Vec<u16>,
    #[serde(default)]
    pub allow_local_binding: bool,
}

/// The network side of one process: its proxy's tasks and its bridges.
/// Dropping it stops them all (when the process closes, or its entry
/// goes).
#[derive(Default)]
pub struct Guard {
    tasks: Vec<AbortHandle>,
    stop: Option<watch::Sender<bool>>,
    /// Sockets the child's namespace made for the UDP relay, by port.
    udp_inside: Option<u16>,
    gate: Option<Arc<Gate>>,
}

impl Guard {
    /// Questions to the client still waiting are answered deny, and no new
    /// ones are asked (`process/terminate`).
    pub fn stop_asking(&self) {
        if let Some(stop) = &self.stop {
            stop.send_replace(true);
        }
    }

    /// Forward what the bridge listeners (made in the child's network
    /// namespace) accept to the host's `127.0.0.1:PORT`; a UDP socket of
    /// the namespace becomes the SOCKS5 UDP relay.
    pub fn bridge(&mut self, listeners: Vec<(u16, OwnedFd)>) {
        for (port, fd) in listeners {
            let is_udp = self.udp_inside == Some(port) && is_datagram(&fd);
            if is_udp {
                let (Some(gate), Ok(socket)) = (&self.gate, udp_socket(fd)) else {
                    continue;
                };
                let task = tokio::spawn(proxy::udp_relay(gate.clone(), socket));
                self.tasks.push(task.abort_handle());
                continue;
            }
            let listener = std::net::TcpListener::from(fd);
            let Ok(listener) = listener
                .set_nonblocking(true)
                .and_then(|_| tokio::net::TcpListener::from_std(listener))
            else {
                continue;
            };
            let task = tokio::spawn(forward(listener, port));
            self.tasks.push(task.abort_handle());
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_asking();
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn is_datagram(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        )
    };
    rc == 0 && kind == libc::SOCK_DGRAM
}

fn udp_socket(fd: OwnedFd) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket)
}

/// Each connection a bridge listener accepts, joined to the host's
/// `127.0.0.1:port`.
async fn forward(listener: tokio::net::TcpListener, port: u16) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut inside, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if connections.len() >= proxy::MAX_CONNECTIONS {
                    continue;
                }
                connections.spawn(async move {
                    if let Ok(mut outside) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A proxy started for one process.
pub struct Launched {
    pub http_port: u16,
    pub socks_port: Option<u16>,
    pub allow_local_binding: bool,
    /// Whether the SOCKS5 UDP relay is on (its port is the SOCKS port).
    pub udp: bool,
    pub guard: Guard,
}

/// Start the proxies `networkProxy` asks for, on loopback ports of their
/// own. `peer`: the connection the session is attached to, for questions
/// and audit records.
pub fn launch(value: &serde_json::Value, process_id: &str, peer: Peer) -> Result<Launched> {
    let config: LaunchConfig = crate::protocol::decode("networkProxy", value.clone())
        .map_err(|e| Error::InvalidParams(format!("invalid network proxy config: {e}")))?;
    let policy = Policy::check(&config, process_id)?;
    let allow_local_binding = policy.allow_local_binding;
    let start_failed = |e: std::io::Error| Error::Internal {
        message: format!("failed to start executor network proxy: {e}"),
        errno: e.raw_os_error(),
    };
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    };
    let http = bind().map_err(start_failed)?;
    let socks = if config.proxy.enable_socks5 {
        Some(bind().map_err(start_failed)?)
    } else {
        None
    };
    let port = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.port()).map_err(start_failed);
    let http_port = port(&http)?;
    let socks_port = socks.as_ref().map(port).transpose()?;
    let (stop, stopped) = watch::channel(false);
    let callback = config.policy_decision_timeout_ms.map(Duration::from_millis);
    let gate = Arc::new(Gate::new(policy, process_id, callback, peer, stopped));
    let mut guard = Guard::default();
    guard.stop = Some(stop);
    guard.gate = Some(gate.clone());
    let task = tokio::spawn(proxy::accept_loop(http, gate.clone(), proxy::serve_http));
    guard.tasks.push(task.abort_handle());
    let udp = config.proxy.enable_socks5 && config.proxy.enable_socks5_udp;
    if let (Some(listener), Some(socks_port)) = (socks, socks_port) {
        let relay = udp.then(|| std::net::SocketAddr::from(([127, 0, 0, 1], socks_port)));
        let socks = Arc::new(proxy::Socks { udp_relay: relay });
        let serve = move |gate, stream, peer| proxy::serve_socks(gate, socks.clone(), stream, peer);
        let task = tokio::spawn(proxy::accept_loop(listener, gate.clone(), serve));
        guard.tasks.push(task.abort_handle());
        if udp {
            guard.udp_inside = Some(socks_port);
            // The relay on the host's loopback, for a child that is not
            // in a namespace of its own; a sandboxed one gets its own.
            if let Ok(socket) = std::net::UdpSocket::bind(("127.0.0.1", socks_port))
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .and_then(tokio::net::UdpSocket::from_std)
            {
                let task = tokio::spawn(proxy::udp_relay(gate.clone(), socket));
                guard.tasks.push(task.abort_handle());
            }
        }
    }
    tracing::debug!(
        process = process_id,
        environment = config.environment_id.as_deref().unwrap_or(""),
        execution = config.execution_id.as_deref().unwrap_or(""),
        http_port,
        ?socks_port,
        "network proxy started"
    );
    Ok(Launched {
        http_port,
        socks_port,
        allow_local_binding,
        udp,
        guard,
    })
}

/// Variables naming the HTTP proxy.
const HTTP_PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY",
    "npm_config_http_proxy",
    "npm_config_https_proxy",
    "npm_config_proxy",
    "NPM_CONFIG_HTTP_PROXY",
    "NPM_CONFIG_HTTPS_PROXY",
    "NPM_CONFIG_PROXY",
    "BUNDLE_HTTP_PROXY",
    "BUNDLE_HTTPS_PROXY",
    "PIP_PROXY",
    "DOCKER_HTTP_PROXY",
    "DOCKER_HTTPS_PROXY",
    "WS_PROXY",
    "WSS_PROXY",
    "ws_proxy",
    "wss_proxy",
];
/// Variables naming the SOCKS5 proxy when there is one.
const ALL_PROXY_VARS: &[&str] = &["ALL_PROXY", "all_proxy", "FTP_PROXY", "ftp_proxy"];
const NO_PROXY_VARS: &[&str] = &[
    "NO_PROXY",
    "no_proxy",
    "npm_config_noproxy",
    "NPM_CONFIG_NOPROXY",
    "YARN_NO_PROXY",
    "BUNDLE_NO_PROXY",
];

impl Launched {
    /// The child's proxy variables, as the reference sets them (over
    /// whatever the client sent).
    pub fn apply_env(&self, env: &mut BTreeMap<String, String>) {
        let http = format!("http://127.0.0.1:{}", self.http_port);
        let all = match self.socks_port {
            Some(port) => format!("socks5h://127.0.0.1:{port}"),
            None => http.clone(),
        };
        for name in HTTP_PROXY_VARS {
            env.insert(name.to_string(), http.clone());
        }
        for name in ALL_PROXY_VARS {
            env.insert(name.to_string(), all.clone());
        }
        let no_proxy = if self.allow_local_binding {
            "localhost,127.0.0.1,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"
        } else {
            ""
        };
        for name in NO_PROXY_VARS {
            env.insert(name.to_string(), no_proxy.to_string());
        }
        let flag = if self.allow_local_binding { "1" } else { "0" };
        for (name, value) in [
            ("CODEX_NETWORK_PROXY_ACTIVE", "1"),
            ("CODEX_NETWORK_ALLOW_LOCAL_BINDING", flag),
            ("ELECTRON_GET_USE_PROXY", "true"),
            ("NODE_USE_ENV_PROXY", "1"),
        ] {
            env.insert(name.to_string(), value.to_string());
        }
        env.remove("CODEX_NETWORK_PROXY_ATTRIBUTION");
    }

    /// The loopback ports a sandboxed child may reach: the proxies'.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = std::iter::once(self.http_port)
            .chain(self.socks_port)
            .collect();
        ports.sort_unstable();
        ports
    }
}

/// Loopback proxy endpoints named by the proxy variables of `env` (the
/// reference's source of truth on Linux when it launched no proxy).
pub fn loopback_ports_in(env: &BTreeMap<String, String>) -> Vec<u16> {
    let mut ports = Vec::new();
    for (name, value) in env {
        let upper = name.to_ascii_uppercase();
        let is_proxy_var = HTTP_PROXY_VARS
            .iter()
            .chain(ALL_PROXY_VARS)
            .any(|v| v.eq_ignore_ascii_case(&upper));
        if !is_proxy_var {
            continue;
        }
        let (scheme, rest) = value.split_once("://").unwrap_or(("http", value));
        let auth = rest.split(['/', '?', '#']).next().unwrap_or("");
        let auth = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
        let default = match scheme.to_ascii_lowercase().as_str() {
            "https" => 443,
            s if s.starts_with("socks") => 1080,
            _ => 80,
        };
        let (host, port) = match auth.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (h, p.parse().unwrap_or(0)),
            _ => (auth, default),
        };
        if matches!(host, "localhost" | "127.0.0.1" | "[::1]") && port != 0 {
            ports.push(port);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_endpoints_are_read_from_proxy_variables() {
        let env: BTreeMap<String, String> = [
            ("HTTP_PROXY", "http://127.0.0.1:3128"),
            ("https_proxy", "http://localhost:3129/"),
            ("ALL_PROXY", "socks5h://127.0.0.1"),
            ("NO_PROXY", "127.0.0.1:9"),
            ("FTP_PROXY", "http://proxy.example.com:21"),
            ("PIP_PROXY", "http://[::1]:4000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(loopback_ports_in(&env), vec![1080, 3128, 3129, 4000]);
    }
}
