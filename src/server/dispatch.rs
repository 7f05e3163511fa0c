//! The method table: which handler serves a method, and in which family it
//! is gated. Handlers decode their params, do their work and return a
//! [`Reply`]; none of them knows which transport the request came from.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::Server;
use super::lane::Lane;
use super::session::Session;
use crate::env_policy::child_env;
use crate::error::{Error, Result};
use crate::process::{ReadNow, StartRequest, WriteOutcome, spawn};
use crate::protocol::{
    ListResponse, ProcessIdParams, ReadParams, ResizeParams, SignalParams, StartParams,
    StartResponse, TerminateResponse, TtySize, WriteParams, WriteResponse, method,
};
use crate::sandbox::policy::Rules;
use crate::transport::Outbound;
use crate::{environment, fs, http, net, sandbox};

/// What a handler needs: the server, the caller's session, and state that
/// lives as long as the caller's connection.
#[derive(Clone)]
pub struct Ctx {
    pub server: Arc<Server>,
    pub session: Arc<Session>,
    pub conn: Arc<ConnState>,
}

/// Per-connection state: streaming file handles (closed with the
/// connection) and the lane filesystem requests run on.
pub struct ConnState {
    pub handles: fs::Handles,
    pub lane: Lane,
    /// The connection's own sender: streamed bodies go to the connection
    /// that asked for them, not to whichever the session is attached to.
    pub outbound: Outbound,
    /// `requestId`s of streamed `http/request`s still sending their body.
    pub http_streams: crate::http::ActiveStreams,
    /// Bytes of `process/write`s accepted on this connection whose answer
    /// waits for the child to take what is queued ahead of them.
    pub pending_writes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Bytes of writes one connection may have waiting for room before more
/// are refused (retryable): a client can't grow the server by writing to
/// a child that never reads.
pub const PENDING_WRITE_BUDGET: usize = 64 << 20;

impl ConnState {
    pub fn start(outbound: Outbound) -> Self {
        ConnState {
            handles: fs::Handles::default(),
            lane: Lane::start(),
            outbound,
            http_streams: Default::default(),
            pending_writes: Default::default(),
        }
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Value>> + Send>>;

/// Work that runs after a response is queued, for as long as the
/// connection lasts.
pub type FollowUp = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A result later, with the bytes of its `chunk`.
pub type BytesFuture = Pin<Box<dyn Future<Output = Result<(Value, Vec<u8>)>> + Send>>;

/// An answer later, and what follows it.
pub type ThenFuture = Pin<Box<dyn Future<Output = (Result<Value>, Option<FollowUp>)> + Send>>;

/// A handler's answer: ready now, or after waiting (a long-poll). Ready
/// answers are sent in arrival order; waiting ones never hold up others.
pub enum Reply {
    Ready(Result<Value>),
    /// Ready, with work to run once the response is queued.
    ReadyThen(Result<Value>, Box<dyn FnOnce() + Send>),
    Later(BoxFuture),
    /// Later, with work to run once the response is queued (the
    /// notifications of a streamed body, which must come after it).
    LaterThen(ThenFuture),
    /// Ready, the result already written as JSON text.
    Rendered(Result<Vec<u8>>),
    /// Later, the result written as JSON text.
    LaterRendered(Pin<Box<dyn Future<Output = Result<Vec<u8>>> + Send>>),
    /// Later, a result whose `chunk` is these bytes (`fs/readBlock`).
    LaterWithBytes(BytesFuture),
}

/// A method's entry in the table.
/// The signature every handler has: context, method name, raw params.
pub type Handler = fn(&Ctx, &str, Value) -> Reply;

pub struct Route {
    /// The family named in gating errors ("exec", "filesystem", ...).
    pub family: &'static str,
    pub handler: Handler,
}

/// Look up a method (other than `initialize`, which the connection serves).
pub fn route(name: &str) -> Option<Route> {
    let (family, handler): (&'static str, Handler) = match name {
        method::PROCESS_START => ("exec", start),
        method::PROCESS_READ => ("exec", read),
        method::PROCESS_WRITE => ("exec", write),
        method::PROCESS_CLOSE_STDIN => ("exec", close_stdin),
        method::PROCESS_SIGNAL => ("exec", signal),
        method::PROCESS_RESIZE => ("exec", resize),
        method::PROCESS_TERMINATE => ("exec", terminate),
        method::PROCESS_LIST => ("exec", list),
        method::ENVIRONMENT_INFO => ("environment info", info),
        method::ENVIRONMENT_STATUS => ("environment status", status),
        SERVER_STATUS => ("server status", server_status),
        SESSION_END => ("server status", session_end),
        method::FS_READ_FILE => ("filesystem", fs_method),
        method::FS_WRITE_FILE => ("filesystem", fs_method),
        method::FS_CREATE_DIRECTORY => ("filesystem", fs_method),
        method::FS_GET_METADATA => ("filesystem", fs_method),
        method::FS_READ_DIRECTORY => ("filesystem", fs_method),
        method::FS_REMOVE => ("filesystem", fs_method),
        method::FS_COPY => ("filesystem", fs_method),
        method::FS_RENAME => ("filesystem", fs_method),
        method::FS_CANONICALIZE => ("filesystem", fs_method),
        method::FS_WALK => ("filesystem", fs_method),
        method::FS_OPEN => ("filesystem", fs_open),
        method::FS_READ_BLOCK => ("filesystem", fs_read_block),
        method::FS_CLOSE => ("filesystem", fs_close),
        method::HTTP_REQUEST => ("http", http_request),
        method::CAPABILITY_ROOTS_DISCOVER => ("capability discovery", discover_capabilities),
        method::ENVIRONMENT_CONFIG_READ => ("environment config", environment_config),
        crate::watch::FS_WATCH => ("filesystem", fs_watch),
        crate::watch::FS_UNWATCH => ("filesystem", fs_unwatch),
        crate::watch::FS_READ_CHANGES => ("filesystem", fs_read_changes),
        _ => return None,
    };
    Some(Route { family, handler })
}

use crate::protocol::decode;

fn ready<T: Serialize>(result: Result<T>) -> Reply {
    Reply::Ready(result.and_then(to_value))
}

fn to_value<T: Serialize>(value: T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::Internal {
        message: format!("failed to encode the result: {e}"),
        errno: None,
    })
}

fn start(ctx: &Ctx, name: &str, params: Value) -> Reply {
    let started = (|| {
        let p: StartParams = decode(name, params)?;
        if p.process_id.is_empty() || p.process_id.len() > 256 {
            return Err(Error::InvalidParams(format!(
                "processId must be 1 to 256 bytes, got {}",
                p.process_id.len()
            )));
        }
        if p.argv.is_empty() {
            return Err(Error::InvalidParams("argv must not be empty".into()));
        }
        let mut rules = sandbox::rules(
            p.sandbox.as_ref(),
            Some(&p.cwd.0),
            &ctx.server.workspace_roots,
        )?;
        let mut env = child_env(p.env_policy.as_ref(), &p.env, std::env::vars());
        let launched = match p.network_proxy.as_ref().filter(|v| !v.is_null()) {
            Some(config) => Some(net::launch(config, &p.process_id, ctx.session.peer())?),
            None => None,
        };
        if let Some(launched) = &launched {
            launched.apply_env(&mut env);
        }
        let sandboxed = p.sandbox.as_ref().is_some_and(|v| !v.is_null());
        let managed = if sandboxed && (p.enforce_managed_network || launched.is_some()) {
            Some(managed_network(&p, launched.as_ref(), &env)?)
        } else {
            None
        };
        if managed.is_some() && rules.is_none() {
            // Open filesystem, but still the network namespace.
            rules = Some(Rules {
                fs: None,
                network_restricted: false,
                hidden: crate::endpoints::paths(),
            });
        }
        let prepared = match &rules {
            Some(rules) => Some(Arc::new(sandbox::prepare(
                rules,
                true,
                Some(&p.cwd.0),
                managed.as_ref(),
            )?)),
            None => None,
        };
        let limits = ctx.server.config.limits.apply(
            p.limits.as_ref(),
            ctx.server.containment.controllers(),
            prepared.is_some() && sandbox::needs_user_namespace(),
        )?;
        let unenforced_limits = limits.not_enforced.clone();
        let sandbox_type = if prepared.is_some() {
            sandbox::SANDBOX_TYPE
        } else {
            "none"
        };
        let audit = crate::audit::enabled().then(|| {
            serde_json::json!({
                "session": ctx.session.id,
                "processId": p.process_id,
                "argv": crate::audit::redact_argv(&p.argv),
                "cwd": p.cwd.0,
                "tty": p.tty,
                "sandbox": {
                    "type": sandbox_type,
                    "network": match (&managed, rules.as_ref().map(|r| r.network_restricted)) {
                        (Some(_), _) => "managed",
                        (None, Some(true)) => "restricted",
                        _ => "full",
                    },
                },
                "limits": limits.describe(),
                "envNames": env.keys().collect::<Vec<_>>(),
            })
        });
        let tty = p.tty.then(|| p.tty_size.unwrap_or_default());
        let launch = ctx.session.processes.start(StartRequest {
            id: p.process_id.clone(),
            spec: spawn::Spec {
                argv: &p.argv,
                arg0: p.arg0.as_deref(),
                cwd: &p.cwd.0,
                env: &env,
                tty,
                pipe_stdin: p.pipe_stdin,
                container: Default::default(),
                sandbox: prepared,
            },
            network: launched.map(|l| l.guard),
            notify_output: p.notify_output.unwrap_or(true),
            hold_output: p.hold_output,
            limits,
        })?;
        if let Some(mut event) = audit {
            event["pid"] = launch.pid().into();
            crate::audit::record("process.start", move || event);
        }
        let response = StartResponse {
            process_id: p.process_id,
            sandbox_type,
            unenforced_limits,
        };
        Ok((response, launch))
    })();
    match started {
        Ok((response, launch)) => then(to_value(response), Some(Box::new(move || drop(launch)))),
        Err(err) => Reply::Ready(Err(err)),
    }
}

/// What managed networking enforces for a sandboxed start: the launched
/// proxy's ports, or else the client's `managedNetwork.loopbackPorts` and
/// the loopback endpoints of the child's proxy variables. None at all
/// fails closed.
fn managed_network(
    p: &StartParams,
    launched: Option<&net::Launched>,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<sandbox::Managed> {
    if let Some(l) = launched {
        return Ok(sandbox::Managed {
            ports: l.ports(),
            udp_port: l.socks_port.filter(|_| l.udp),
            local_binding: l.allow_local_binding,
        });
    }
    let given: net::ManagedNetwork = match p.managed_network.as_ref().filter(|v| !v.is_null()) {
        Some(v) => decode("managedNetwork", v.clone())?,
        None => net::ManagedNetwork::default(),
    };
    let mut ports = given.loopback_ports;
    ports.extend(net::loopback_ports_in(env));
    ports.retain(|&port| port != 0);
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return Err(Error::SandboxUnavailable(
            "managed networking requires proxy endpoints".into(),
        ));
    }
    Ok(sandbox::Managed {
        ports,
        udp_port: None,
        local_binding: given.allow_local_binding,
    })
}

fn read(ctx: &Ctx, name: &str, params: Value) -> Reply {
    let p: ReadParams = match decode(name, params) {
        Ok(p) => p,
        Err(err) => return Reply::Ready(Err(err)),
    };
    // A client that reads none of its answers gets no more of them (an
    // acknowledgement's answer is tiny, and it gives a held child room).
    if !p.acknowledge {
        if let Err(err) = ctx.conn.outbound.budget().check() {
            return Reply::Ready(Err(err));
        }
    }
    // Rendered straight from the retained chunks: no `Value`, and base64
    // written into the line once.
    match ctx.session.processes.read(&p) {
        Ok(ReadNow::Ready(response)) => Reply::Rendered(Ok(response.render())),
        Ok(ReadNow::Wait(process)) => {
            let outbound = ctx.conn.outbound.clone();
            Reply::LaterRendered(Box::pin(async move {
                let response = process.read(&p).await?;
                if !p.acknowledge {
                    outbound.budget().check()?;
                }
                Ok(response.render())
            }))
        }
        Err(err) => Reply::Ready(Err(err)),
    }
}

fn write(ctx: &Ctx, name: &str, params: Value) -> Reply {
    use std::sync::atomic::Ordering;
    let pending = ctx.conn.pending_writes.clone();
    let mut size = 0;
    let decoded = decode::<WriteParams>(name, params).and_then(|p| {
        if p.write_id.as_deref() == Some("") {
            return Err(Error::InvalidParams("writeId must not be empty".into()));
        }
        let waiting = pending.load(Ordering::Relaxed);
        if waiting >= PENDING_WRITE_BUDGET {
            // Refused before it is accepted: nothing of it is kept, and
            // the same write (same id) can be sent again later.
            return Err(Error::WritesPending {
                waiting,
                limit: PENDING_WRITE_BUDGET,
            });
        }
        size = p.chunk.0.len();
        Ok(ctx
            .session
            .processes
            .write(&p.process_id, p.chunk.0, p.write_id.as_deref()))
    });
    match decoded {
        Ok(WriteOutcome::Now(status, effect)) => then(to_value(WriteResponse { status }), effect),
        Ok(WriteOutcome::WhenRoom(status)) => {
            pending.fetch_add(size, Ordering::Relaxed);
            Reply::Later(Box::pin(async move {
                // Counted until answered (or dropped with the connection).
                struct Counted(Arc<std::sync::atomic::AtomicUsize>, usize);
                impl Drop for Counted {
                    fn drop(&mut self) {
                        self.0.fetch_sub(self.1, Ordering::Relaxed);
                    }
                }
                let _counted = Counted(pending, size);
                to_value(WriteResponse {
                    status: status.await,
                })
            }))
        }
        Err(err) => Reply::Ready(Err(err)),
    }
}

fn close_stdin(ctx: &Ctx, name: &str, params: Value) -> Reply {
    match decode::<ProcessIdParams>(name, params) {
        Ok(p) => {
            let (status, effect) = ctx.session.processes.close_stdin(&p.process_id);
            then(to_value(WriteResponse { status }), effect)
        }
        Err(err) => Reply::Ready(Err(err)),
    }
}

fn signal(ctx: &Ctx, name: &str, params: Value) -> Reply {
    match decode::<SignalParams>(name, params) {
        Ok(p) => {
            let effect = ctx.session.processes.signal(&p.process_id, p.signal);
            then(Ok(serde_json::json!({})), effect)
        }
        Err(err) => Reply::Ready(Err(err)),
    }
}

fn resize(ctx: &Ctx, name: &str, params: Value) -> Reply {
    ready(decode::<ResizeParams>(name, params).and_then(|p| {
        let size = TtySize {
            cols: p.cols,
            rows: p.rows,
        };
        ctx.session.processes.resize(&p.process_id, size)?;
        Ok(serde_json::json!({}))
    }))
}

fn terminate(ctx: &Ctx, name: &str, params: Value) -> Reply {
    match decode::<ProcessIdParams>(name, params) {
        Ok(p) => {
            let (running, effect) = ctx.session.processes.terminate(&p.process_id);
            then(to_value(TerminateResponse { running }), effect)
        }
        Err(err) => Reply::Ready(Err(err)),
    }
}

/// A ready result with an optional effect to run after the response.
fn then(result: Result<Value>, effect: Option<crate::process::Effect>) -> Reply {
    match effect {
        Some(effect) => Reply::ReadyThen(result, effect),
        None => Reply::Ready(result),
    }
}

fn list(ctx: &Ctx, _name: &str, _params: Value) -> Reply {
    ready(Ok(ListResponse {
        processes: ctx.session.processes.list(),
    }))
}

fn info(ctx: &Ctx, _name: &str, _params: Value) -> Reply {
    ready(Ok(environment::info(
        &ctx.server.workspace_roots,
        &ctx.server.containment,
        &ctx.server.config.limits,
    )))
}

fn status(_ctx: &Ctx, _name: &str, _params: Value) -> Reply {
    ready(Ok(serde_json::json!({ "status": "ready" })))
}

/// `server/status` (an extension): the server's pid, uptime, and every
/// session with its processes. For `exec-server daemon status`.
pub const SERVER_STATUS: &str = "server/status";

fn server_status(ctx: &Ctx, _name: &str, _params: Value) -> Reply {
    let sessions: Vec<Value> = ctx
        .server
        .sessions
        .snapshot()
        .into_iter()
        .map(|(id, attached, processes)| {
            serde_json::json!({"sessionId": id, "attached": attached, "processes": processes})
        })
        .collect();
    let mut status = serde_json::json!({
        "pid": std::process::id(),
        "uptimeMs": ctx.server.started.elapsed().as_millis() as u64,
        "sessions": sessions,
    });
    if let Some(counts) = crate::audit::counts() {
        status["auditLog"] = counts;
    }
    ready(Ok(status))
}

/// `session/end` (an extension): the client is done with its session; it
/// ends now instead of lingering detached for the TTL (a `--persist`
/// daemon with no session left can exit). Its processes are killed.
pub const SESSION_END: &str = "session/end";

fn session_end(ctx: &Ctx, _name: &str, _params: Value) -> Reply {
    ctx.server.sessions.end(&ctx.session);
    ready(Ok(serde_json::json!({})))
}

/// `fs/watch` (an extension): start watching; `{watchId}`.
/// The walk of a recursive watch runs on the connection's lane.
fn fs_watch(ctx: &Ctx, name: &str, params: Value) -> Reply {
    let prepared = lane_job(ctx, name, params, |ctx, name, rules, params| {
        let p: crate::watch::WatchParams = decode(name, params)?;
        ctx.session.watches.prepare(p, rules)
    });
    let watches = ctx.session.watches.clone();
    match prepared {
        Ok(job) => Reply::Later(Box::pin(async move {
            let id = watches.add(job.await?)?;
            Ok(serde_json::json!({"watchId": id}))
        })),
        Err(err) => Reply::Ready(Err(err)),
    }
}

/// `fs/unwatch` (an extension).
fn fs_unwatch(ctx: &Ctx, name: &str, params: Value) -> Reply {
    let done = decode::<crate::watch::WatchIdParams>(name, params)
        .and_then(|p| ctx.session.watches.remove(&p.watch_id));
    ready(done.map(|()| serde_json::json!({})))
}

/// `fs/readChanges` (an extension): what a watch reported after a seq.
fn fs_read_changes(ctx: &Ctx, name: &str, params: Value) -> Reply {
    ready(
        decode::<crate::watch::ReadChangesParams>(name, params)
            .and_then(|p| ctx.session.watches.read(&p.watch_id, p.after_seq)),
    )
}

/// Run a filesystem operation on the connection's lane, with the sandbox
/// rules its `sandbox` param binds to (`None`: unsandboxed).
fn on_lane(
    ctx: &Ctx,
    name: &str,
    params: Value,
    op: impl FnOnce(&Ctx, &str, Option<Rules>, Value) -> Result<Value> + Send + 'static,
) -> Reply {
    match lane_job(ctx, name, params, op) {
        Ok(job) => Reply::Later(Box::pin(job)),
        Err(err) => Reply::Ready(Err(err)),
    }
}

/// `op` queued on the connection's lane, with the sandbox rules its
/// `sandbox` param binds to; its result once done.
fn lane_job<T: Send + 'static>(
    ctx: &Ctx,
    name: &str,
    params: Value,
    op: impl FnOnce(&Ctx, &str, Option<Rules>, Value) -> Result<T> + Send + 'static,
) -> Result<impl Future<Output = Result<T>> + Send + 'static> {
    let rules = sandbox::rules(params.get("sandbox"), None, &ctx.server.workspace_roots)?;
    let job_ctx = ctx.clone();
    let name = name.to_string();
    let done = ctx
        .conn
        .lane
        .run(move || op(&job_ctx, &name, rules, params));
    Ok(async move {
        done.await.unwrap_or_else(|| {
            Err(Error::Internal {
                message: "the filesystem worker stopped".into(),
                errno: None,
            })
        })
    })
}

/// Every path-based `fs/*` method: here, or in a sandboxed helper.
fn fs_method(ctx: &Ctx, name: &str, params: Value) -> Reply {
    if name == method::FS_CREATE_DIRECTORY
        && params["private"] == true
        && !params["sandbox"].is_null()
    {
        return Reply::Ready(Err(fs::private_refused()));
    }
    on_lane(ctx, name, params, |ctx, name, rules, params| {
        let max = ctx.server.config.max_message_bytes;
        if name == method::FS_READ_FILE {
            // Checked as the job starts: jobs queued behind a client that
            // reads nothing produce nothing more.
            ctx.conn.outbound.budget().check()?;
        }
        match rules {
            None => fs::run_method(name, params, max),
            Some(rules) => sandbox::helper::run(&rules, name, &params, max).map(|(v, _)| v),
        }
    })
}

fn fs_open(ctx: &Ctx, name: &str, params: Value) -> Reply {
    on_lane(ctx, name, params, |ctx, name, rules, params| {
        let max = ctx.server.config.max_message_bytes;
        let p: fs::OpenParams = decode(name, params.clone())?;
        ctx.conn.handles.open(p, |path| match rules {
            None => fs::open_for_reading(path),
            Some(rules) => match sandbox::helper::run(&rules, name, &params, max)? {
                (_, Some(file)) => Ok(file),
                (_, None) => Err(Error::Internal {
                    message: format!("the sandboxed helper sent no file for {}", path.display()),
                    errno: None,
                }),
            },
        })
    })
}

fn fs_read_block(ctx: &Ctx, name: &str, params: Value) -> Reply {
    // The block travels beside its result (`chunk` is filled in by the
    // codec: base64 in JSON, raw in a binary frame).
    let job = lane_job(ctx, name, params, |ctx, name, _, params| {
        ctx.conn.outbound.budget().check()?;
        let (data, eof) = ctx.conn.handles.read_block(decode(name, params)?)?;
        Ok((serde_json::json!({"chunk": null, "eof": eof}), data))
    });
    match job {
        Ok(job) => Reply::LaterWithBytes(Box::pin(job)),
        Err(err) => Reply::Ready(Err(err)),
    }
}

fn fs_close(ctx: &Ctx, name: &str, params: Value) -> Reply {
    on_lane(ctx, name, params, |ctx, name, _, params| {
        ctx.conn.handles.close(decode(name, params)?)
    })
}

fn http_request(ctx: &Ctx, name: &str, params: Value) -> Reply {
    match decode(name, params).and_then(|p| http::Request::check(p, &ctx.conn.http_streams)) {
        Ok(request) => {
            let outbound = ctx.conn.outbound.clone();
            Reply::LaterThen(Box::pin(request.send(outbound)))
        }
        Err(err) => Reply::Ready(Err(err)),
    }
}

/// `capabilityRoots/discoverV1`: each root scanned on the connection's
/// lane, here or inside the root's own sandbox; a root whose sandbox can't
/// be had gets its `error`, the others their findings, in request order.
fn discover_capabilities(ctx: &Ctx, name: &str, params: Value) -> Reply {
    use crate::capabilities::{self, DiscoverParams};
    // The call has no `sandbox` of its own (each root has), so the lane
    // job gets no rules.
    on_lane(ctx, name, params, |ctx, name, _, params| {
        let params: DiscoverParams = decode(name, params)?;
        capabilities::check(&params)?;
        let max = ctx.server.config.max_message_bytes;
        let roots = &ctx.server.workspace_roots;
        let found: Vec<Value> = params
            .roots
            .into_iter()
            .map(|root| {
                let path = root.path.0;
                let answer = match sandbox::rules(root.sandbox.as_ref(), None, roots) {
                    Ok(None) => Ok(capabilities::scan(&root.id, &path)),
                    Ok(Some(rules)) => {
                        let uri = crate::protocol::path_to_uri(&path);
                        let scan = serde_json::json!({"id": root.id, "path": uri});
                        sandbox::helper::run(&rules, capabilities::SCAN_ROOT, &scan, max)
                            .map(|(value, _)| value)
                    }
                    Err(err) => Err(err),
                };
                answer.unwrap_or_else(|err| capabilities::failed(&root.id, &path, err.to_string()))
            })
            .collect();
        Ok(serde_json::json!({ "roots": found }))
    })
}

/// `environmentConfig/read`: the executor's config files are read on the
/// connection's lane (blocking I/O), never in a sandbox (the call has none).
fn environment_config(ctx: &Ctx, name: &str, params: Value) -> Reply {
    on_lane(ctx, name, params, |_, _, _, params| {
        crate::env_config::read(params)
    })
}
