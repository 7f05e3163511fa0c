//! The server: configuration, the session registry, and the stdio mode.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::environment;
use crate::process::Limits;
use crate::process::container::Containment;
use crate::process::output::Retention;
use crate::transport::{self, stdio};

pub mod connection;
pub mod dispatch;
mod files;
pub mod lane;
pub mod persist;
pub mod session;
mod turns;

/// Server settings (the command-line flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// `--max-message-bytes`.
    pub max_message_bytes: usize,
    /// `--retain-bytes`.
    pub retain_bytes: usize,
    /// `--retain-chunks`.
    pub retain_chunks: usize,
    /// `--closed-retention-ms`.
    pub closed_retention: Duration,
    /// `--detached-session-ttl-ms`.
    pub detached_ttl: Duration,
    /// `--workspace-root`.
    pub workspace_roots: Vec<PathBuf>,
    /// `--idle-exit-ms`: exit after this long with no session.
    pub idle_exit: Option<Duration>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--connection-token-file`: the token WebSocket peers must show.
    pub connection_token: Option<String>,
    /// `--insecure-listen`: allow a non-loopback WebSocket address without
    /// a token.
    pub insecure_listen: bool,
    /// `--ws-ping-interval-ms`: how often WebSocket peers are pinged; a
    /// peer that answers no ping for two intervals is dropped.
    pub ws_ping_every: Duration,
    /// Binary frames are granted to clients that ask (not with
    /// `--no-binary-frames`).
    pub binary_frames: bool,
    /// `--concurrent-requests N`: at most N ordinary requests of a
    /// connection run at once, started in arrival order (1: one after
    /// another, as the reference does by default); `None`: no limit.
    pub concurrent_requests: Option<usize>,
    /// `--exit-on-stdin-close` (remote mode): stdin's end ends the server.
    pub exit_on_stdin_close: bool,
    /// `--default-limits` and `--max-limits`: what a process gets when it
    /// asks for nothing, and the most it may ask for.
    pub limits: crate::process::limits::Policy,
    /// `--audit-log` and `--audit-log-max-bytes`.
    pub audit_log: Option<(crate::audit::Target, Option<u64>)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message_bytes: 64 * 1024 * 1024,
            retain_bytes: 1024 * 1024,
            retain_chunks: 50_000,
            closed_retention: Duration::from_secs(30),
            detached_ttl: Duration::from_secs(30),
            workspace_roots: Vec::new(),
            idle_exit: None,
            pid_file: None,
            connection_token: None,
            insecure_listen: false,
            ws_ping_every: Duration::from_secs(30),
            binary_frames: true,
            concurrent_requests: None,
            exit_on_stdin_close: false,
            limits: Default::default(),
            audit_log: None,
        }
    }
}

/// State shared by every connection of one server process.
pub struct Server {
    pub config: Config,
    pub sessions: Arc<session::Registry>,
    /// The roots `:workspace_roots` binds to.
    pub workspace_roots: Vec<PathBuf>,
    /// How processes are contained, and the watchdog.
    pub containment: Arc<Containment>,
    /// Set once to end every connection (the server is shutting down).
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// When the server started.
    pub started: std::time::Instant,
    next_connection: AtomicU64,
}

/// What the server tells every attached client as it shuts down on a
/// signal (an extension): `{reason}`.
pub const SERVER_STOPPING: &str = "server/stopping";

impl Server {
    pub fn new(config: Config, containment: Arc<Containment>) -> Arc<Self> {
        let limits = Limits {
            retention: Retention {
                max_bytes: config.retain_bytes,
                max_chunks: config.retain_chunks,
            },
            closed_retention: config.closed_retention,
        };
        Arc::new(Server {
            sessions: Arc::new(session::Registry::new(
                limits,
                containment.clone(),
                config.detached_ttl,
            )),
            workspace_roots: environment::workspace_roots(&config.workspace_roots),
            containment,
            shutdown: tokio::sync::watch::channel(false).0,
            started: std::time::Instant::now(),
            config,
            next_connection: AtomicU64::new(1),
        })
    }

    fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}

/// How long shutdown waits for killed children to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last lines to reach stdout.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// One connection on this process's stdin and stdout.
    Stdio,
    /// Any number of connections on a Unix socket at this path.
    Unix(PathBuf),
    /// Any number of WebSocket connections on this TCP address (port 0
    /// picks one).
    Ws(std::net::SocketAddr),
}

impl Listen {
    /// `stdio`, `stdio://`, `unix:PATH` or `unix://PATH`.
    pub fn parse(text: &str) -> Result<Listen, String> {
        if text == "stdio" || text == "stdio://" {
            return Ok(Listen::Stdio);
        }
        if let Some(address) = text.strip_prefix("ws://") {
            return address.parse().map(Listen::Ws).map_err(|_| {
                format!("invalid websocket --listen URL `{text}`; expected `ws://IP:PORT`")
            });
        }
        let path = text
            .strip_prefix("unix://")
            .or_else(|| text.strip_prefix("unix:"))
            .ok_or_else(|| {
                format!(
                    "unsupported --listen URL `{text}`; expected `ws://IP:PORT`, `unix:PATH` or `stdio`"
                )
            })?;
        if path.is_empty() {
            return Err(format!("{text}: the socket needs a path"));
        }
        Ok(Listen::Unix(PathBuf::from(path)))
    }
}

/// Serve on every address of `listen`; all connections share one session
/// registry, so a session started on one can be resumed on another. With
/// stdio among them, the end of stdin ends the server (nobody can
/// reattach there); otherwise a terminating signal does. Either way every
/// process is killed and reaped before this returns.
///
/// Call this from a single-threaded process: it forks the watchdog before
/// starting the async runtime.
pub fn run(config: Config, listen: &[Listen]) -> std::io::Result<()> {
    run_with(config, listen, None)
}

/// A task that serves connections of its own into the server (remote
/// mode's relay socket), started once the server is up.
pub type Service = Box<
    dyn FnOnce(Arc<Server>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

/// [`run`], with `service` running beside the listeners.
pub fn run_with(
    config: Config,
    listen: &[Listen],
    service: Option<Service>,
) -> std::io::Result<()> {
    let limit = crate::sys::raise_nofile();
    crate::sys::reserve_spare_descriptor();
    crate::sys::return_freed_memory();
    tracing::debug!("descriptor limit {limit}");
    let containment = Arc::new(Containment::start());
    config
        .limits
        .check(
            containment.controllers(),
            crate::sandbox::needs_user_namespace(),
        )
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::Unsupported, why))?;
    // After the watchdog's fork: the writer is a thread of its own.
    if let Some((target, max_bytes)) = &config.audit_log {
        crate::audit::start(target.clone(), *max_bytes)
            .map_err(|err| std::io::Error::new(err.kind(), format!("--audit-log: {err}")))?;
        crate::audit::record("server.start", || {
            serde_json::json!({
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "containment": containment.mode().name(),
                "limitsEnforced": containment.controllers().enforced(),
            })
        });
        // No sandboxed process may read or touch it.
        match target {
            crate::audit::Target::File(path) | crate::audit::Target::Unix(path) => {
                crate::endpoints::add_path(path);
                let mut old = path.clone().into_os_string();
                old.push(".1");
                crate::endpoints::add_path(std::path::Path::new(&old));
            }
            crate::audit::Target::Stderr => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let release = containment.clone();
    let served = runtime.block_on(async move {
        tokio::spawn(reap_orphans(containment.clone()));
        let watched = containment.clone();
        tokio::spawn(async move { watched.watch_watchdog().await });
        let server = Server::new(config, containment);
        // Before anything says the server is ready.
        let mut terminating = Terminating::catch();
        let mut listeners = Vec::new();
        let mut ws_listeners = Vec::new();
        // Whatever this server listens on, the persist daemons of its user
        // are out of a sandboxed child's reach too.
        for dir in persist::directories() {
            crate::endpoints::add_path(&dir);
        }
        for address in listen {
            match address {
                Listen::Unix(path) => {
                    let bound = transport::unix::bind(path)?;
                    crate::endpoints::add_path(path);
                    tracing::info!("listening on unix:{}", path.display());
                    listeners.push(bound);
                }
                Listen::Ws(address) => {
                    if !address.ip().is_loopback() && server.config.connection_token.is_none() {
                        if !server.config.insecure_listen {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::PermissionDenied,
                                format!(
                                    "refusing to listen on ws://{address} without a connection token: \
                                     anyone who reaches it could run processes as this user \
                                     (give --connection-token-file, or --insecure-listen)"
                                ),
                            ));
                        }
                        tracing::warn!(
                            "listening on ws://{address} without a connection token (--insecure-listen)"
                        );
                    }
                    let bound = tokio::net::TcpListener::bind(address).await?;
                    crate::endpoints::add_tcp(bound.local_addr()?);
                    tracing::info!("listening on ws://{}", bound.local_addr()?);
                    ws_listeners.push(bound);
                }
                Listen::Stdio => {}
            }
        }
        let _pid_file = match &server.config.pid_file {
            Some(path) => Some(PidFile::write(path)?),
            None => None,
        };
        let stdio = listen.contains(&Listen::Stdio);
        if !stdio {
            // Ready: say where, as the first line on stdout (which carries
            // no protocol in this mode).
            for bound in &listeners {
                println_address(&format!("unix:{}", bound.path.display()));
            }
            for bound in &ws_listeners {
                println_address(&format!("ws://{}", bound.local_addr()?));
            }
        }
        let mut accepting = tokio::task::JoinSet::new();
        for bound in listeners {
            accepting.spawn(accept_unix(server.clone(), bound));
        }
        for bound in ws_listeners {
            accepting.spawn(accept_ws(server.clone(), bound));
        }
        if let Some(service) = service {
            tokio::spawn(service(server.clone()));
        }
        let (stdio_writer, mut serve_stdio) = if stdio {
            let io = stdio::start(server.config.max_message_bytes);
            let serve = tokio::spawn(connection::serve(server.clone(), io.transport));
            (Some(io.writer), Some(serve))
        } else {
            (None, None)
        };
        let watch_stdin = server.config.exit_on_stdin_close;
        let stdin_closed = async {
            match &mut serve_stdio {
                Some(serve) => {
                    let _ = serve.await;
                }
                None if watch_stdin => stdin_eof().await,
                None => std::future::pending::<()>().await,
            }
        };
        let stdin_ended = tokio::select! {
            () = stdin_closed => {
                tracing::debug!("stdin closed");
                true
            }
            name = terminating.recv() => {
                tracing::info!("received {name}, shutting down");
                let reason = format!("{name}, e.g. from `exec-server daemon stop`");
                // Before anything ends: a client that would resume knows
                // not to, and says why.
                server.sessions.tell_all(|| crate::jsonrpc::Outgoing::Notification {
                    method: SERVER_STOPPING,
                    params: serde_json::json!({"reason": reason}),
                });
                server.sessions.wait_written(FLUSH_TIMEOUT).await;
                false
            }
            () = idle(&server) => {
                tracing::info!("no session for the idle time, exiting");
                false
            }
        };
        // Every connection ends, with the tasks it still runs; the
        // listeners close (their sockets are removed).
        server.shutdown.send_replace(true);
        accepting.abort_all();
        while accepting.join_next().await.is_some() {}
        if let (Some(serve), false) = (serve_stdio, stdin_ended) {
            let _ = serve.await;
        }
        if tokio::time::timeout(REAP_TIMEOUT, server.sessions.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("some children were not reaped in time");
        }
        drop(server);
        // The writer ends once every sender is gone; don't wait forever for
        // a reader that stopped reading.
        if let Some(writer) = stdio_writer {
            let _ = tokio::time::timeout(
                FLUSH_TIMEOUT,
                tokio::task::spawn_blocking(move || writer.join()),
            )
            .await;
        }
        Ok::<(), std::io::Error>(())
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
    release.release();
    // The last events (the sessions' ends, the last exits) reach the log.
    crate::audit::record(
        "server.stop",
        || serde_json::json!({"pid": std::process::id()}),
    );
    crate::audit::flush(FLUSH_TIMEOUT);
    served
}

/// Returns once stdin ends (its bytes are read and dropped).
async fn stdin_eof() {
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// A pid file, removed when dropped.
struct PidFile(PathBuf);

impl PidFile {
    /// Made anew (never through a link, never over someone else's file);
    /// nothing is left behind when it can't be written whole.
    fn write(path: &std::path::Path) -> std::io::Result<PidFile> {
        use std::io::Write;
        let mut file = files::create_new(path, 0o644)?;
        let written = file
            .write_all(format!("{}\n", std::process::id()).as_bytes())
            .and_then(|()| file.flush());
        if let Err(err) = written {
            let _ = std::fs::remove_file(path);
            return Err(std::io::Error::new(
                err.kind(),
                format!("{}: {err}", path.display()),
            ));
        }
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Returns once no session has existed for `--idle-exit-ms`; never
/// without it.
async fn idle(server: &Server) {
    let Some(limit) = server.config.idle_exit else {
        return std::future::pending().await;
    };
    let mut empty_since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100).min(limit)).await;
        if server.sessions.is_empty() {
            let since = *empty_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= limit {
                return;
            }
        } else {
            empty_since = None;
        }
    }
}

/// `exec-server daemon status`: ask the daemon at `place` for its
/// sessions, as text.
pub fn daemon_status(place: &persist::Place) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(&place.socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut answer = |line: String| -> std::io::Result<serde_json::Value> {
        writer.write_all(line.as_bytes())?;
        let mut text = String::new();
        reader.read_line(&mut text)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    };
    answer(
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"clientName\":\"exec-server daemon status\"}}\n{\"jsonrpc\":\"2.0\",\"method\":\"initialized\"}\n"
            .into(),
    )?;
    let status = answer(format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"{}\",\"params\":{{}}}}\n",
        dispatch::SERVER_STATUS
    ))?;
    // The query's own session ends here, so that an idle daemon still
    // exits on time.
    let _ = answer(format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"{}\",\"params\":{{}}}}\n",
        dispatch::SESSION_END
    ));
    let r = &status["result"];
    let mut text = format!(
        "pid {}\nsocket {}\nuptime {} s\n",
        r["pid"],
        place.socket.display(),
        r["uptimeMs"].as_u64().unwrap_or(0) / 1000
    );
    for session in r["sessions"].as_array().into_iter().flatten() {
        // The status query's own session is not worth showing.
        let processes = session["processes"].as_array().cloned().unwrap_or_default();
        let attached = session["attached"] == true;
        if attached && processes.is_empty() {
            continue;
        }
        text.push_str(&format!(
            "session {} {}\n",
            session["sessionId"].as_str().unwrap_or("?"),
            if attached { "attached" } else { "detached" }
        ));
        let sid = session["sessionId"].as_str().unwrap_or("?").to_string();
        let name = place
            .socket
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for p in processes {
            text.push_str(&format!(
                "  {} pid {} {} {}\n",
                p["processId"].as_str().unwrap_or("?"),
                p["pid"],
                if p["exited"] == true {
                    "exited"
                } else {
                    "running"
                },
                p["argv"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_default()
            ));
            if !attached && p["closed"] != true {
                text.push_str(&format!(
                    "    take it up: exec-server run --via '... --stdio --persist={name}' --attach {sid}/{}\n",
                    p["processId"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Ok(text)
}

/// The address line printed when the server is ready.
fn println_address(address: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{address}");
    let _ = out.flush();
}

/// Request heads a WebSocket listener waits for at once: a new connection
/// beyond this pushes out the one that has waited longest for the rest of
/// its head (a flood of heads that never end can't keep a real client
/// out: its head comes with its first packets, and is read before the
/// next connection is accepted).
const MAX_PENDING_HEADS: usize = 64;
/// Past this many (none of them read from yet), new connections are
/// turned away.
const MAX_PENDING_HARD: usize = 192;
/// Connections one Unix listener serves at once.
const MAX_UNIX_CONNECTIONS: usize = 128;
/// WebSocket connections one listener serves at once.
const MAX_WS_CONNECTIONS: usize = 256;
/// Of these, from one peer address.
const MAX_WS_PER_PEER: usize = 128;
/// Descriptors kept free for the work of clients already served (process
/// starts, files): a connection accepted past this is turned away.
const FD_RESERVE: u64 = 128;

/// Accept WebSocket connections until the server shuts down.
async fn accept_ws(server: Arc<Server>, bound: tokio::net::TcpListener) {
    use std::collections::{HashMap, VecDeque};
    use std::os::fd::AsRawFd;
    let mut connections = tokio::task::JoinSet::new();
    let mut pending = tokio::task::JoinSet::new();
    let mut waiting: VecDeque<(tokio::task::AbortHandle, Arc<HeadProgress>)> = VecDeque::new();
    let served = Arc::new(tokio::sync::Semaphore::new(MAX_WS_CONNECTIONS));
    let per_peer: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    let (upgraded_tx, mut upgraded) = tokio::sync::mpsc::channel::<(
        transport::Transport,
        tokio::sync::OwnedSemaphorePermit,
        PeerSlot,
    )>(16);
    loop {
        let accepted = tokio::select! {
            accepted = bound.accept() => accepted,
            Some((transport, permit, slot)) = upgraded.recv() => {
                let server = server.clone();
                connections.spawn(async move {
                    connection::serve(server, transport).await;
                    drop((permit, slot));
                });
                continue;
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(_) = pending.join_next(), if !pending.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and the like: this connection is lost, the
                // listener is not.
                tracing::warn!("accepting a websocket connection failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The kernel hands out the lowest free descriptor: one this high
        // means the reserve is being eaten.
        if stream.as_raw_fd() as u64 + FD_RESERVE >= crate::sys::nofile_limit() {
            tracing::warn!("turned away a websocket connection from {peer}: descriptors are short");
            transport::ws::turn_away(stream).await;
            continue;
        }
        waiting.retain(|(h, progress)| !h.is_finished() && !progress.complete());
        if waiting.len() >= MAX_PENDING_HEADS {
            // The head that has stalled longest goes; one not yet looked
            // at, or complete, is never pushed out.
            let stalled = waiting
                .iter()
                .enumerate()
                .filter_map(|(i, (_, p))| p.stalled_for().map(|d| (i, d)))
                .max_by_key(|(i, d)| (*d, std::cmp::Reverse(*i)))
                .map(|(i, _)| i);
            match stalled {
                Some(i) => {
                    tracing::debug!("dropped the longest-stalled unfinished request head");
                    if let Some((handle, _)) = waiting.remove(i) {
                        handle.abort();
                    }
                }
                None if waiting.len() >= MAX_PENDING_HARD => {
                    tracing::warn!(
                        "turned away a websocket connection from {peer}: {MAX_PENDING_HARD} request heads are pending"
                    );
                    transport::ws::turn_away(stream).await;
                    continue;
                }
                None => {}
            }
        }
        let progress = Arc::new(HeadProgress::default());
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let served = served.clone();
        let per_peer = per_peer.clone();
        let upgraded_tx = upgraded_tx.clone();
        let watched = progress.clone();
        let handle = pending.spawn(async move {
            watched.started();
            let token = server.config.connection_token.clone();
            let limits = transport::ws::Limits {
                max_message_bytes: server.config.max_message_bytes,
                ping_every: server.config.ws_ping_every,
            };
            let local = stream.local_addr().ok();
            let has_token = token.is_some();
            // Room is taken once the head is in (a pending head holds only
            // its place among the pending ones).
            let room = Arc::new(std::sync::Mutex::new(None));
            let taken = room.clone();
            let vet = move || async move {
                watched.finished();
                let Ok(permit) = served.try_acquire_owned() else {
                    let why = format!("{MAX_WS_CONNECTIONS} connections are open");
                    return Some(("503 Service Unavailable", why));
                };
                let Some(slot) = PeerSlot::take(&per_peer, peer.ip()) else {
                    let why = format!("{MAX_WS_PER_PEER} connections are open from {}", peer.ip());
                    return Some(("503 Service Unavailable", why));
                };
                *crate::sync::lock(&taken) = Some((permit, slot));
                let local = local?;
                refuse_tcp_peer(local, peer, has_token)
                    .await
                    .map(|why| ("403 Forbidden", why))
            };
            match transport::ws::accept(stream, token.as_deref(), limits, vet).await {
                Ok(transport::ws::Accepted::Connection(transport)) => {
                    let room = crate::sync::lock(&room).take();
                    if let Some((permit, slot)) = room {
                        let _ = upgraded_tx.send((transport, permit, slot)).await;
                    }
                }
                Ok(transport::ws::Accepted::Answered) => {}
                Err(err) => tracing::debug!("a websocket request from {peer} failed: {err}"),
            }
        });
        waiting.push_back((handle, progress));
        // Let it read what it was sent before the next is accepted: a
        // flood must not keep the heads already in from being looked at.
        tokio::task::yield_now().await;
    }
}

/// How far a pending connection's request head has come: not looked at
/// yet, being read (since when), or complete.
#[derive(Default)]
struct HeadProgress {
    /// Milliseconds since [`HeadProgress::EPOCH`] when reading began; 0:
    /// not yet; `u64::MAX`: complete.
    since: std::sync::atomic::AtomicU64,
}

impl HeadProgress {
    fn now_ms() -> u64 {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
            + 1
    }

    fn started(&self) {
        self.since.store(Self::now_ms(), Ordering::Relaxed);
    }

    fn finished(&self) {
        self.since.store(u64::MAX, Ordering::Relaxed);
    }

    fn complete(&self) -> bool {
        self.since.load(Ordering::Relaxed) == u64::MAX
    }

    /// How long its head has been read without coming to an end.
    fn stalled_for(&self) -> Option<Duration> {
        match self.since.load(Ordering::Relaxed) {
            0 | u64::MAX => None,
            since => Some(Duration::from_millis(Self::now_ms().saturating_sub(since))),
        }
    }
}

/// One connection counted against its peer address's share; given back
/// when dropped.
struct PeerSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut all = crate::sync::lock(counts);
        let n = all.entry(ip).or_insert(0);
        if *n >= MAX_WS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut all = crate::sync::lock(&self.counts);
        if let Some(n) = all.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.ip);
            }
        }
    }
}

/// Why a TCP peer may not use this server, if so. A peer on this host is
/// found in the socket table: one of the server's sandboxed children (or
/// the server itself, dialing for a child through its proxy) is refused
/// whatever it shows; without a token, so is a peer of another uid
/// (root included, as on the Unix socket).
async fn refuse_tcp_peer(
    local: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    token: bool,
) -> Option<String> {
    let found = tokio::task::spawn_blocking(move || {
        let found = transport::peer::tcp_peer(local, peer)?;
        let holder = found.and_then(|f| transport::peer::refuse_holder(f.inode, f.uid));
        Ok::<_, std::io::Error>((found, holder))
    })
    .await;
    let (found, holder) = match found {
        Ok(Ok(found)) => found,
        // Unknown: only a token can vouch for it.
        Ok(Err(err)) if !token => return Some(format!("its owner could not be found: {err}")),
        _ => return None,
    };
    if let Some(why) = holder {
        return Some(why);
    }
    // SAFETY: getter without failure modes.
    let ours = unsafe { libc::geteuid() };
    match found {
        Some(f) if !token && f.uid != ours => Some(format!(
            "uid {} is not the server's ({ours}), and no connection token is set",
            f.uid
        )),
        // A loopback peer is always in the table while it is connected:
        // one that can't be found is not vouched for.
        None if !token && peer.ip().to_canonical().is_loopback() => {
            Some("its socket is not in this host's socket table".into())
        }
        _ => None,
    }
}

/// Accept connections on a Unix socket until the server shuts down.
async fn accept_unix(server: Arc<Server>, bound: transport::unix::Listener) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = match bound.listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("accepting on {} failed: {err}", bound.path.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_UNIX_CONNECTIONS {
            // Each costs two threads: bounded, like every listener.
            tracing::warn!(
                "refused a connection on {}: {MAX_UNIX_CONNECTIONS} are open",
                bound.path.display()
            );
            continue;
        }
        if let Some(why) = transport::unix::refuse_peer(&stream) {
            tracing::warn!("refused a connection on {}: {why}", bound.path.display());
            continue;
        }
        match transport::unix::start(stream, server.config.max_message_bytes) {
            Ok(transport) => {
                connections.spawn(connection::serve(server.clone(), transport));
            }
            Err(err) => tracing::warn!("a connection could not be served: {err}"),
        }
    }
}

/// Reap the orphans that come back to the server (subreaper mode) each
/// time a child exits.
async fn reap_orphans(containment: Arc<Containment>) {
    use tokio::signal::unix::{SignalKind, signal};
    if *containment.mode() != crate::process::container::Mode::Subreaper {
        return;
    }
    let Ok(mut child) = signal(SignalKind::child()) else {
        tracing::warn!("cannot watch SIGCHLD; orphans will not be reaped");
        return;
    };
    while child.recv().await.is_some() {
        let containment = containment.clone();
        let _ = tokio::task::spawn_blocking(move || containment.reap_orphans()).await;
    }
}

/// The terminating signals, caught from the moment this is made (so that
/// one arriving before the server waits for it is not lost, nor fatal).
struct Terminating {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Terminating {
    fn catch() -> Terminating {
        use tokio::signal::unix::{SignalKind, signal};
        Terminating {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// The name of the first one to arrive.
    async fn recv(&mut self) -> &'static str {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => "SIGTERM",
            () = one(&mut self.int) => "SIGINT",
            () = one(&mut self.hup) => "SIGHUP",
        }
    }
}
