//! `exec-bench`: measure a server of this protocol through the client
//! library, and in the same run the direct way of doing the same work, so
//! every figure comes with a baseline from the same (noisy) machine.
//!
//! ```sh
//! cargo build --release && cargo run --release -p exec-bench -- [--via "CMD ..."] [--json FILE] [--quick] [--case NAME]...
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;

mod plot;
use exec_server::client::{Client, Event, ServerCommand, StartOptions};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// Benchmarks a server of the exec-server protocol against direct baselines.
#[derive(Debug, Clone, Parser)]
#[command(name = "exec-bench")]
struct Args {
    /// The server command (default: this build's exec-server --stdio).
    #[arg(long, value_name = "CMD")]
    via: Option<String>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Fewer repetitions and smaller sizes (a smoke run, under 30 s).
    #[arg(long)]
    quick: bool,
    /// Run only this case (repeatable; default: all).
    #[arg(long = "case", value_name = "NAME", value_enum)]
    cases: Vec<Case>,
    /// How output travels: `json` (base64 notifications), `binary`
    /// (binary frames, when the server offers them); repeatable; default:
    /// both, side by side.
    #[arg(long = "wire", value_name = "WIRE", value_enum)]
    wires: Vec<Wire>,
    /// Draw the scaling cases as an SVG chart into FILE.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// The wire of the current pass.
    #[arg(skip)]
    wire: Wire,
}

/// How output travels from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Wire {
    #[default]
    Json,
    Binary,
}

/// The cases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    ColdStart,
    RoundTrip,
    SandboxedRoundTrip,
    Throughput,
    FanOut,
    Interference,
    Idle,
    Reconnect,
    /// Fan-out at 1, 4, 16, 64 and 256 processes.
    ScaleFanOut,
    /// One process writing 1 MiB to 1 GiB.
    ScaleOutput,
    /// One process writing in chunks of 4 KiB to 1 MiB.
    ScaleChunks,
    /// A remote executor over Noise through `exec-server relay`, next to
    /// plain `ws://` and a pipe: throughput, handshake, first byte,
    /// reconnect.
    Remote,
    /// A round trip with every limit set (memory, CPU, pids, deadline,
    /// output) against one without.
    Limits,
    /// A round trip on a server writing an audit log against one without.
    Audit,
    /// Events per second through `fs/watch`.
    Watch,
}

impl Args {
    fn runs(&self, case: Case) -> bool {
        self.cases.is_empty() || self.cases.contains(&case)
    }
}

/// Sizes and repetitions of one run.
struct Plan {
    cold_starts: usize,
    round_trips: usize,
    stream_bytes: u64,
    stream_runs: usize,
    fan_out: usize,
    fan_out_bytes: u64,
    interference_reads: usize,
    interference_starts: usize,
    churn: usize,
    reconnects: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                cold_starts: 5,
                round_trips: 20,
                stream_bytes: 32 << 20,
                stream_runs: 1,
                fan_out: 32,
                fan_out_bytes: 1 << 20,
                interference_reads: 50,
                interference_starts: 10,
                churn: 100,
                reconnects: 3,
            }
        } else {
            Plan {
                cold_starts: 30,
                round_trips: 200,
                stream_bytes: 512 << 20,
                stream_runs: 5,
                fan_out: 256,
                fan_out_bytes: 4 << 20,
                interference_reads: 200,
                interference_starts: 50,
                churn: 1000,
                reconnects: 20,
            }
        }
    }
}

/// Median and 95th percentile of some samples.
#[derive(Debug, Clone, Copy, Serialize)]
struct Summary {
    median: f64,
    p95: f64,
    samples: usize,
}

impl Summary {
    fn of(mut samples: Vec<f64>) -> Summary {
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(i).copied().unwrap_or(f64::NAN)
        };
        Summary {
            median: at(0.5),
            p95: at(0.95),
            samples: samples.len(),
        }
    }
}

/// One line of the table.
#[derive(Debug, Serialize)]
struct Row {
    case: String,
    /// How output travelled.
    wire: Wire,
    /// For a scaling case: its chart and where on the x axis it sits.
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<(&'static str, f64)>,
    unit: &'static str,
    server: Summary,
    baseline: Option<Summary>,
    /// server / baseline (medians), when there is a baseline.
    ratio: Option<f64>,
    note: String,
}

fn row(
    case: &str,
    unit: &'static str,
    server: Vec<f64>,
    baseline: Option<Vec<f64>>,
    note: String,
) -> Row {
    let server = Summary::of(server);
    let baseline = baseline.map(Summary::of);
    Row {
        case: case.to_string(),
        wire: Wire::Json,
        scale: None,
        unit,
        server,
        baseline,
        ratio: baseline.map(|b| server.median / b.median),
        note,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// The cost of a dropped connection: a client on a `--persist` bridge
/// whose bridge is killed (as a dropped ssh would end it) resumes by
/// itself; the time from the kill to the first byte of output after it
/// (caught up from the retained log, or new). With `--via`, the command
/// must be resumable (`--persist`, or a `unix:` address); the case is
/// skipped otherwise.
async fn reconnect(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    let runtime = std::env::temp_dir().join(format!("exec-bench-{}", std::process::id()));
    std::fs::create_dir_all(&runtime)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700))?;
    }
    let name = format!("bench-{}", std::process::id());
    let command = match &args.via {
        Some(via) => ServerCommand::parse(via)?,
        None => server_command(args, &[])?
            .arg(format!("--persist={name}"))
            .env("XDG_RUNTIME_DIR", &runtime),
    };
    if !command.resumable() {
        eprintln!("reconnect: skipped, the --via command is not resumable (no --persist)");
        return Ok(Vec::new());
    }
    let client = Client::new(command);
    let mut process = client.start(ticker()).await?;
    let mut samples = Vec::new();
    for _ in 0..plan.reconnects {
        next_output(&mut process).await?;
        let Some(bridge) = client.server_pid().filter(|&p| p > 1) else {
            return Err("no bridge process to kill".into());
        };
        let t = Instant::now();
        // SAFETY: plain syscall on the bridge this client started.
        unsafe { libc::kill(bridge, libc::SIGKILL) };
        next_output(&mut process).await?;
        samples.push(ms(t.elapsed()));
    }
    let _ = process.terminate().await;
    client.shutdown().await;
    if args.via.is_none() {
        let exe = std::env::current_exe()?.with_file_name("exec-server");
        let _ = std::process::Command::new(exe)
            .args(["daemon", "stop", "--persist", &name])
            .env("XDG_RUNTIME_DIR", &runtime)
            .output();
        let _ = std::fs::remove_dir_all(&runtime);
    }
    Ok(vec![row(
        "reconnect and resume (bridge killed to next output byte)",
        "ms",
        samples,
        None,
        "a --persist bridge SIGKILLed; the client starts a new one and resumes".into(),
    )])
}

/// A process that prints a line every 5 ms until it is ended: output to
/// wait for across a reconnect.
fn ticker() -> StartOptions {
    StartOptions::new(
        "ticker",
        ["sh", "-c", "while :; do echo tick; sleep 0.005; done"],
    )
    .cwd("/")
}

/// Wait for the next chunk of output of `process`.
async fn next_output(process: &mut exec_server::client::Process) -> Result<(), BoxError> {
    loop {
        match process.next_event().await? {
            Some(Event::Output { .. }) => return Ok(()),
            Some(_) => {}
            None => return Err("the process ended".into()),
        }
    }
}

/// The server command: `--via`, or the exec-server beside this binary.
fn server_command(args: &Args, extra: &[&str]) -> Result<ServerCommand, BoxError> {
    if let Some(via) = &args.via {
        return Ok(wired(args, ServerCommand::parse(via)?));
    }
    let exe = std::env::current_exe()?;
    let server = exe.with_file_name("exec-server");
    if !server.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release), or pass --via",
            server.display()
        )
        .into());
    }
    let mut cmd = ServerCommand::new(server).arg("--stdio");
    for a in extra {
        cmd = cmd.arg(*a);
    }
    Ok(wired(args, cmd))
}

/// The command asking for frames or not, as the pass wants.
fn wired(args: &Args, cmd: ServerCommand) -> ServerCommand {
    match args.wire {
        Wire::Json => cmd.json_only(),
        Wire::Binary => cmd,
    }
}

/// Kibibytes of a /proc/PID/status field (VmRSS, VmHWM).
fn proc_kib(pid: i32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Run a process through `client` until it is closed; payload bytes seen.
async fn drain(client: &Client, id: String, argv: Vec<String>) -> Result<u64, BoxError> {
    drain_with(client, StartOptions::new(id, argv).cwd("/")).await
}

/// `n` round trips of `ours(i)` through `a` and `theirs(i)` through `b`,
/// one after the other (so both see the same machine): the milliseconds
/// of each side.
async fn interleaved(
    n: usize,
    a: &Client,
    ours: impl Fn(usize) -> StartOptions,
    b: &Client,
    theirs: impl Fn(usize) -> StartOptions,
) -> Result<(Vec<f64>, Vec<f64>), BoxError> {
    let mut server = Vec::with_capacity(n);
    let mut baseline = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        drain_with(a, ours(i)).await?;
        server.push(ms(t.elapsed()));
        let t = Instant::now();
        drain_with(b, theirs(i)).await?;
        baseline.push(ms(t.elapsed()));
    }
    Ok((server, baseline))
}

/// `true` as process `id`.
fn true_as(id: String) -> StartOptions {
    StartOptions::new(id, ["true"]).cwd("/")
}

/// Run a process started with `options` until it is closed; payload
/// bytes seen.
async fn drain_with(client: &Client, options: StartOptions) -> Result<u64, BoxError> {
    let mut process = client.start(options).await?;
    let mut bytes = 0u64;
    while let Some(event) = process.next_event().await? {
        match event {
            Event::Output { data, .. } => bytes += data.len() as u64,
            Event::Lost { bytes: lost } => return Err(format!("{lost} bytes were lost").into()),
            Event::Exited(_) => {}
            Event::Closed => break,
        }
    }
    Ok(bytes)
}

/// The same command run directly, stdout read through a pipe.
async fn direct(argv: &[String]) -> Result<u64, BoxError> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = out.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    child.wait().await?;
    Ok(bytes)
}

fn head(bytes: u64) -> Vec<String> {
    vec![
        "head".into(),
        "-c".into(),
        bytes.to_string(),
        "/dev/zero".into(),
    ]
}

async fn spawn_true() -> Result<Duration, BoxError> {
    let t = Instant::now();
    tokio::process::Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    Ok(t.elapsed())
}

async fn cold_start(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    let mut server = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..plan.cold_starts {
        let client = Client::new(server_command(args, &[])?);
        let t = Instant::now();
        client.session_id().await?;
        server.push(ms(t.elapsed()));
        client.shutdown().await;
        baseline.push(ms(spawn_true().await?));
    }
    Ok(row(
        "cold start (spawn to initialize response)",
        "ms",
        server,
        Some(baseline),
        "baseline: spawn and reap `true`".into(),
    ))
}

async fn round_trip(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    let mut server = Vec::new();
    let mut baseline = Vec::new();
    for i in 0..plan.round_trips {
        let t = Instant::now();
        drain(&client, format!("rt{i}"), vec!["true".into()]).await?;
        server.push(ms(t.elapsed()));
        baseline.push(ms(spawn_true().await?));
    }
    client.shutdown().await;
    Ok(row(
        "round trip (process/start `true` to process/closed)",
        "ms",
        server,
        Some(baseline),
        "baseline: tokio::process spawn and reap `true`".into(),
    ))
}

/// The cost of limits on a start: `true` with every limit set (those the
/// host can't enforce are left out, `bestEffort`) against `true` without,
/// through the same server, interleaved.
async fn limits_round_trip(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    let limits = exec_server::limits::Requested {
        memory_bytes: Some(512 << 20),
        cpu_percent: Some(100.0),
        pids: Some(256),
        timeout_ms: Some(60_000),
        output_bytes: Some(1 << 30),
        best_effort: true,
        ..Default::default()
    };
    let info = client.environment_info().await?;
    let enforced = info.capabilities["limits"].clone();
    let (server, baseline) = interleaved(
        plan.round_trips,
        &client,
        |i| true_as(format!("lim{i}")).limits(limits.clone()),
        &client,
        |i| true_as(format!("plain{i}")),
    )
    .await?;
    client.shutdown().await;
    Ok(row(
        "round trip with limits (`true`, every limit)",
        "ms",
        server,
        Some(baseline),
        format!("baseline: the same start without limits; enforced here: {enforced}"),
    ))
}

/// The cost of the audit log: round trips on a server writing one (to a
/// file) against a server without, interleaved.
async fn audit_round_trip(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    if args.via.is_some() {
        return Err("the audit case starts its own servers; run it without --via".into());
    }
    let dir = std::env::temp_dir().join(format!("exec-bench-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("audit.log");
    let log_arg = log.display().to_string();
    let audited = Client::new(server_command(args, &["--audit-log", &log_arg])?);
    let plain = Client::new(server_command(args, &[])?);
    audited.session_id().await?;
    plain.session_id().await?;
    let (server, baseline) = interleaved(
        plan.round_trips,
        &audited,
        |i| true_as(format!("a{i}")),
        &plain,
        |i| true_as(format!("p{i}")),
    )
    .await?;
    audited.shutdown().await;
    plain.shutdown().await;
    let lines = std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row(
        "round trip with the audit log on (`true`)",
        "ms",
        server,
        Some(baseline),
        format!("baseline: a server without --audit-log; {lines} lines logged"),
    ))
}

/// Events per second through `fs/watch`: files made in a watched
/// directory, from the first create to the last event received, against
/// making them alone.
async fn watch_events(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    if args.via.is_some() {
        return Err("the watch case makes files here; run it without --via".into());
    }
    let files = if plan.round_trips < 100 {
        2_000
    } else {
        20_000
    };
    let runs = plan.stream_runs.max(1);
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    let mut server = Vec::new();
    let mut baseline = Vec::new();
    for run in 0..runs {
        let dir =
            std::env::temp_dir().join(format!("exec-bench-watch-{}-{run}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut watcher = client.watch(&dir, true).await?;
        let t = Instant::now();
        let maker = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                for i in 0..files {
                    let _ = std::fs::File::create(dir.join(format!("f{i}")));
                }
            })
        };
        let mut seen = 0;
        while seen < files {
            match tokio::time::timeout(Duration::from_secs(30), watcher.next()).await {
                Ok(Some(changes)) => seen += changes?.len(),
                _ => return Err(format!("only {seen} of {files} events arrived").into()),
            }
        }
        maker.await?;
        server.push(files as f64 / t.elapsed().as_secs_f64());
        watcher.unwatch().await?;
        let _ = std::fs::remove_dir_all(&dir);
        // The kernel's own cost: the same creates under a bare inotify
        // watch that a thread drains as fast as it can.
        let dir =
            std::env::temp_dir().join(format!("exec-bench-plain-{}-{run}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        baseline.push(files as f64 / bare_inotify(&dir, files)?.as_secs_f64());
        let _ = std::fs::remove_dir_all(&dir);
    }
    client.shutdown().await;
    Ok(row(
        &format!("fs/watch events ({files} creates)"),
        "events/s",
        server,
        Some(baseline),
        "from the first create to the last event received; baseline: the same creates \
         under a bare inotify watch a thread drains (the kernel's own cost)"
            .into(),
    ))
}

/// Create `files` files in `dir` under a bare inotify watch drained by a
/// thread; the time until the drain has them all.
fn bare_inotify(dir: &std::path::Path, files: usize) -> Result<Duration, BoxError> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscalls on a fd owned here.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a valid C string and our fd.
    if unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE | libc::IN_MODIFY) } < 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: ours.
        unsafe { libc::close(fd) };
        return Err(err.into());
    }
    let t = Instant::now();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0;
        while seen < files {
            // SAFETY: reads into our buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0;
            while at + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap_or([0; 4]));
                at += 16 + len as usize;
                seen += 1;
            }
        }
    });
    for i in 0..files {
        let _ = std::fs::File::create(dir.join(format!("f{i}")));
    }
    let _ = drain.join();
    let elapsed = t.elapsed();
    // SAFETY: ours.
    unsafe { libc::close(fd) };
    Ok(elapsed)
}

/// The cost of the sandbox (namespaces, mounts, the init, Landlock,
/// seccomp) on a start: `true` under the workspace-write preset against
/// `true` without a sandbox, both through the same server.
async fn sandboxed_round_trip(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    let cwd = std::env::temp_dir();
    let intent = exec_server::client::run::sandbox_intent(
        exec_server::client::run::SandboxMode::WorkspaceWrite,
        false,
        std::slice::from_ref(&cwd),
    );
    let (server, baseline) = interleaved(
        plan.round_trips,
        &client,
        |i| {
            StartOptions::new(format!("sb{i}"), ["true"])
                .cwd(&cwd)
                .sandbox(intent.clone())
        },
        &client,
        |i| true_as(format!("plain{i}")),
    )
    .await?;
    client.shutdown().await;
    Ok(row(
        "sandboxed round trip (workspace-write `true`)",
        "ms",
        server,
        Some(baseline),
        "baseline: the same start without a sandbox".into(),
    ))
}

async fn throughput(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    let argv = head(plan.stream_bytes);
    let mut notified = Vec::new();
    let mut polled = Vec::new();
    let mut piped = Vec::new();
    let mut lost = 0u64;
    // Polling needs the whole output retained: a local server gets a
    // retention that holds it; another server keeps its own setting.
    let retain = (plan.stream_bytes + (1 << 20)).to_string();
    for run in 0..plan.stream_runs {
        let client = Client::new(server_command(args, &[])?);
        client.session_id().await?;
        let t = Instant::now();
        let got = drain(&client, format!("n{run}"), argv.clone()).await?;
        notified.push(mb_per_s(got, t.elapsed()));
        client.shutdown().await;

        let client = Client::new(server_command(args, &["--retain-bytes", &retain])?);
        client.session_id().await?;
        let t = Instant::now();
        let (got, missed) = poll(&client, &format!("r{run}"), &argv).await?;
        polled.push(mb_per_s(got, t.elapsed()));
        lost += missed;
        client.shutdown().await;

        let t = Instant::now();
        let got = direct(&argv).await?;
        piped.push(mb_per_s(got, t.elapsed()));
    }
    let size = format!("{} MiB", plan.stream_bytes >> 20);
    Ok(vec![
        row(
            &format!("output throughput, notifications ({size})"),
            "MB/s",
            notified,
            Some(piped.clone()),
            "baseline: the same command through a plain pipe".into(),
        ),
        row(
            &format!("output throughput, process/read 1 MiB polls ({size})"),
            "MB/s",
            polled,
            Some(piped),
            if lost > 0 {
                format!("{lost} bytes fell out of retention before they were read")
            } else {
                "every byte read back".into()
            },
        ),
    ])
}

/// Read a process's output by `process/read` polls of 1 MiB; (bytes
/// read, bytes that fell out of retention first). Started poll-only: the
/// server pushes nothing (the bytes are not sent twice) and holds the
/// child rather than dropping what is not read yet (a server that does
/// not know these members ignores them, and may drop some).
async fn poll(client: &Client, id: &str, argv: &[String]) -> Result<(u64, u64), BoxError> {
    let options = StartOptions::new(id, argv.to_vec()).cwd("/").poll_only();
    let _process = client.start(options).await?;
    let mut after = 0u64;
    let mut bytes = 0u64;
    loop {
        let r = client
            .read_output(id, after, Some(1 << 20), Some(1000))
            .await?;
        bytes += r.chunks.iter().map(|c| c.data.len() as u64).sum::<u64>();
        after = r.next_seq.saturating_sub(1).max(after);
        if r.closed && r.chunks.is_empty() {
            break;
        }
    }
    let expected = argv[2].parse::<u64>().unwrap_or(bytes);
    Ok((bytes, expected.saturating_sub(bytes)))
}

/// How cost grows with the number of processes streaming at once.
async fn scale_fan_out(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    let counts: &[usize] = if args.quick {
        &[1, 4, 16]
    } else {
        &[1, 4, 16, 64, 256]
    };
    let mut rows = Vec::new();
    for &n in counts {
        let mut row = fan_out_of(args, n, plan.fan_out_bytes).await?;
        row.scale = Some(("fan-out", n as f64));
        rows.push(row);
    }
    Ok(rows)
}

/// How throughput grows with the size of one process's output.
async fn scale_output(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    let sizes: &[u64] = if args.quick {
        &[1, 16]
    } else {
        &[1, 16, 256, 1024]
    };
    let _ = plan;
    let mut rows = Vec::new();
    for &mib in sizes {
        let name = format!("output of one process, {mib} MiB");
        let mut row = one_stream(args, &name, head(mib << 20)).await?;
        row.scale = Some(("output size (MiB)", mib as f64));
        rows.push(row);
    }
    Ok(rows)
}

/// `argv` through a fresh server and through a plain pipe: MB/s of each.
async fn one_stream(args: &Args, name: &str, argv: Vec<String>) -> Result<Row, BoxError> {
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    let t = Instant::now();
    let got = drain(&client, "one".into(), argv.clone()).await?;
    let served = mb_per_s(got, t.elapsed());
    client.shutdown().await;
    let t = Instant::now();
    let got = direct(&argv).await?;
    let piped = mb_per_s(got, t.elapsed());
    Ok(row(
        name,
        "MB/s",
        vec![served],
        Some(vec![piped]),
        "baseline: a plain pipe".into(),
    ))
}

/// How throughput depends on the size of the child's writes.
async fn scale_chunks(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    let total: u64 = if args.quick { 16 << 20 } else { 256 << 20 };
    let _ = plan;
    let mut rows = Vec::new();
    for kib in [4u64, 64, 1024] {
        let argv: Vec<String> = vec![
            "dd".into(),
            "if=/dev/zero".into(),
            format!("bs={}", kib << 10),
            format!("count={}", total / (kib << 10)),
            "status=none".into(),
        ];
        let name = format!("writes of {kib} KiB ({} MiB)", total >> 20);
        let mut row = one_stream(args, &name, argv).await?;
        row.scale = Some(("write size (KiB)", kib as f64));
        rows.push(row);
    }
    Ok(rows)
}

async fn fan_out(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    fan_out_of(args, plan.fan_out, plan.fan_out_bytes).await
}

/// `n` processes writing `bytes` each at once, through the server and
/// directly.
async fn fan_out_of(args: &Args, n: usize, bytes: u64) -> Result<Row, BoxError> {
    let plan = &Plan {
        fan_out: n,
        fan_out_bytes: bytes,
        ..Plan::new(true)
    };
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    let pid = client.server_pid().unwrap_or(0);
    let argv = head(plan.fan_out_bytes);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..plan.fan_out {
        let (client, argv) = (client.clone(), argv.clone());
        tasks.push(tokio::spawn(async move {
            drain(&client, format!("f{i}"), argv).await
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.map_err(|e| e.to_string())??;
    }
    let served = t.elapsed();
    let peak = proc_kib(pid, "VmHWM:").unwrap_or(f64::NAN) / 1024.0;
    client.shutdown().await;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..plan.fan_out {
        let argv = argv.clone();
        tasks.push(tokio::spawn(async move { direct(&argv).await }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let direct_time = t.elapsed();
    let expected = plan.fan_out as u64 * plan.fan_out_bytes;
    Ok(row(
        &format!(
            "fan-out ({} processes x {} MiB at once)",
            plan.fan_out,
            plan.fan_out_bytes >> 20
        ),
        "ms",
        vec![ms(served)],
        Some(vec![ms(direct_time)]),
        format!(
            "server peak RSS {peak:.1} MiB; {} of {} MiB received",
            total >> 20,
            expected >> 20
        ),
    ))
}

async fn interference(args: &Args, plan: &Plan) -> Result<Row, BoxError> {
    let client = Client::new(server_command(args, &[])?);
    client.session_id().await?;
    // Started as the library starts them (file: URIs, every member the
    // reference requires), so that --via measures any server.
    client
        .start(StartOptions::new("idle", ["sleep", "600"]).cwd("/"))
        .await?;
    let start_latency = |i: usize, tag: &'static str| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            client
                .start(StartOptions::new(format!("{tag}{i}"), ["true"]).cwd("/"))
                .await?;
            Ok::<f64, BoxError>(ms(t.elapsed()))
        }
    };
    let mut unloaded = Vec::new();
    for i in 0..plan.interference_starts {
        unloaded.push(start_latency(i, "u").await?);
    }
    let mut reads = Vec::new();
    for _ in 0..plan.interference_reads {
        let client = client.clone();
        reads.push(tokio::spawn(async move {
            client
                .call(
                    "process/read",
                    json!({"processId": "idle", "afterSeq": 0, "waitMs": 30000}),
                )
                .await
        }));
    }
    // Let the reads reach the server and start waiting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut loaded = Vec::new();
    for i in 0..plan.interference_starts {
        loaded.push(start_latency(i, "l").await?);
    }
    let pending = reads.iter().filter(|r| !r.is_finished()).count();
    client
        .call("process/terminate", json!({"processId": "idle"}))
        .await?;
    for r in reads {
        let _ = r.await;
    }
    client.shutdown().await;
    Ok(row(
        &format!(
            "process/start latency with {} long-polls pending",
            plan.interference_reads
        ),
        "ms",
        loaded,
        Some(unloaded),
        format!("baseline: the same server unloaded; {pending} reads were still pending"),
    ))
}

async fn idle(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    // Closed processes are kept readable for a while (30 s by default);
    // a short retention lets the run see what is left once they are gone.
    let retention = Duration::from_millis(200);
    let client = Client::new(server_command(
        args,
        &["--closed-retention-ms", &retention.as_millis().to_string()],
    )?);
    client.session_id().await?;
    let pid = client.server_pid().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = proc_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;
    let churn = |from: usize| {
        let client = client.clone();
        async move {
            for batch in (from..from + plan.churn).collect::<Vec<_>>().chunks(50) {
                let mut tasks = Vec::new();
                for &i in batch {
                    let client = client.clone();
                    tasks.push(tokio::spawn(async move {
                        drain(&client, format!("c{i}"), vec!["true".into()]).await
                    }));
                }
                for t in tasks {
                    t.await.map_err(|e| e.to_string())??;
                }
            }
            Ok::<(), BoxError>(())
        }
    };
    // Each closed process is forgotten once its retention has passed.
    let settle = retention + Duration::from_millis(300);
    churn(0).await?;
    tokio::time::sleep(settle).await;
    let after_one = proc_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;
    churn(plan.churn).await?;
    tokio::time::sleep(settle).await;
    let after_two = proc_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;
    client.shutdown().await;
    Ok(vec![
        row(
            "idle RSS after the handshake",
            "MiB",
            vec![fresh],
            None,
            String::new(),
        ),
        row(
            &format!("idle RSS after {} processes came and went", plan.churn),
            "MiB",
            vec![after_one],
            None,
            format!(
                "after {} more: {after_two:.1} MiB (closed processes expired after {} ms{})",
                plan.churn,
                retention.as_millis(),
                if args.via.is_some() {
                    "; not passed to --via"
                } else {
                    ""
                }
            ),
        ),
    ])
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<58} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>7}  note",
        "case", "wire", "unit", "median", "p95", "base med", "base p95", "ratio"
    );
    for r in rows {
        let (bm, bp) = match r.baseline {
            Some(b) => (format!("{:.2}", b.median), format!("{:.2}", b.p95)),
            None => ("-".into(), "-".into()),
        };
        let ratio = r
            .ratio
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into());
        let wire = match r.wire {
            Wire::Json => "json",
            Wire::Binary => "binary",
        };
        println!(
            "{:<58} {:>6} {:>6} {:>10.2} {:>10.2} {:>10} {:>10} {:>7}  {}",
            r.case, wire, r.unit, r.server.median, r.server.p95, bm, bp, ratio, r.note
        );
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("exec-bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), BoxError> {
    let plan = Plan::new(args.quick);
    let started = Instant::now();
    let mut rows = Vec::new();
    let wires = if args.wires.is_empty() {
        vec![Wire::Json, Wire::Binary]
    } else {
        args.wires.clone()
    };
    for &case in <Case as clap::ValueEnum>::value_variants() {
        if !args.runs(case) {
            continue;
        }
        // Each case with each wire, one after the other.
        for &wire in &wires {
            let args = &Args {
                wire,
                ..args.clone()
            };
            let mut case_rows = match case {
                Case::ColdStart => vec![cold_start(args, &plan).await?],
                Case::RoundTrip => vec![round_trip(args, &plan).await?],
                Case::SandboxedRoundTrip => vec![sandboxed_round_trip(args, &plan).await?],
                Case::Throughput => throughput(args, &plan).await?,
                Case::FanOut => vec![fan_out(args, &plan).await?],
                Case::Interference => vec![interference(args, &plan).await?],
                Case::Idle => idle(args, &plan).await?,
                Case::Reconnect => reconnect(args, &plan).await?,
                Case::ScaleFanOut => scale_fan_out(args, &plan).await?,
                Case::ScaleOutput => scale_output(args, &plan).await?,
                Case::ScaleChunks => scale_chunks(args, &plan).await?,
                Case::Remote => remote(args, &plan).await?,
                Case::Limits => vec![limits_round_trip(args, &plan).await?],
                Case::Audit => vec![audit_round_trip(args, &plan).await?],
                Case::Watch => vec![watch_events(args, &plan).await?],
            };
            for row in &mut case_rows {
                row.wire = wire;
            }
            rows.extend(case_rows);
        }
    }
    print_table(&rows);
    if let Some(path) = &args.plot {
        plot::draw(path, &rows)?;
        println!("chart: {}", path.display());
    }
    println!("({:.1} s in all)", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        let doc: Value = json!({
            "server": args.via.clone().unwrap_or_else(|| "exec-server --stdio (this build)".into()),
            "quick": args.quick,
            "cases": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `exec-server ARGS` beside this binary; with `first_line`, wait
/// for its first stdout line (a listener's URL) and return it.
fn spawn_server(args: &[&str], first_line: bool) -> Result<(Killed, String), BoxError> {
    use std::io::BufRead;
    let exe = std::env::current_exe()?.with_file_name("exec-server");
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(if first_line {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    if first_line {
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    }
    Ok((Killed(child), line.trim().to_string()))
}

/// A TCP forwarder in front of the relay that can cut the connections of
/// orchestrators (`role=harness` in the request line) and leaves the
/// executor's alone: a dropped stream, not a dropped executor.
struct Forwarder {
    port: u16,
    harnesses: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<tokio::sync::Notify>>>>,
}

impl Forwarder {
    async fn start(upstream: u16) -> Result<Forwarder, BoxError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let harnesses: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<tokio::sync::Notify>>>> =
            Default::default();
        let held = harnesses.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let held = held.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let mut peek = [0u8; 512];
                    let n = client.peek(&mut peek).await.unwrap_or(0);
                    let cut = std::sync::Arc::new(tokio::sync::Notify::new());
                    if String::from_utf8_lossy(&peek[..n]).contains("role=harness") {
                        held.lock().unwrap().push(cut.clone());
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Ok(Forwarder { port, harnesses })
    }

    /// Cut every orchestrator connection open now.
    fn cut(&self) {
        for cut in self.harnesses.lock().unwrap().drain(..) {
            cut.notify_one();
        }
    }
}

/// The remote transport: `exec-server relay` and `exec-server --remote`
/// on loopback, reached with `noise+http://` (the library, as an
/// orchestrator would), next to the same work over plain `ws://` and a
/// pipe.
async fn remote(args: &Args, plan: &Plan) -> Result<Vec<Row>, BoxError> {
    if args.via.is_some() {
        eprintln!("remote: skipped with --via (it starts its own relay and executor)");
        return Ok(Vec::new());
    }
    let mut rows = Vec::new();
    // Throughput runs with each wire (binary frames travel over Noise as
    // over ws://, to a client that asks); the rest once.
    let once = args.wire == Wire::Json;
    // The handshake's own cost, both ends in this process (ML-KEM-768
    // and X25519 on each side).
    if once {
        use exec_server::remote::noise::{Identity, Initiator, Responder, prologue};
        let executor = Identity::generate().map_err(|e| e.to_string())?;
        let harness = Identity::generate().map_err(|e| e.to_string())?;
        let key = executor.public();
        let mut samples = Vec::new();
        for i in 0..plan.round_trips {
            let p = prologue("env", "reg", &format!("s{i}"));
            let t = Instant::now();
            let mut initiator = Initiator::new(&harness, &key, &p).map_err(|e| e.to_string())?;
            let first = initiator
                .first_message(b"authorization")
                .map_err(|e| e.to_string())?;
            let mut responder = Responder::new(&executor, &p).map_err(|e| e.to_string())?;
            responder.read_first(&first).map_err(|e| e.to_string())?;
            let (second, _) = responder.reply().map_err(|e| e.to_string())?;
            initiator.finish(&second).map_err(|e| e.to_string())?;
            samples.push(ms(t.elapsed()));
        }
        rows.push(row(
            "Noise handshake, both ends (hybrid IK, ML-KEM-768 + X25519)",
            "ms",
            samples,
            None,
            "computation only, one core: both messages written and read".into(),
        ));
    }
    // A relay whose URLs point at a forwarder (to cut streams), and an
    // executor registered with it.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay_port = probe.local_addr()?.port();
    drop(probe);
    let forwarder = Forwarder::start(relay_port).await?;
    let public = format!("ws://127.0.0.1:{}", forwarder.port);
    let listen = format!("ws://127.0.0.1:{relay_port}");
    let (_relay, _) = spawn_server(
        &["relay", "--listen", &listen, "--public-url", &public],
        true,
    )?;
    let registry = format!("http://127.0.0.1:{relay_port}");
    let retain = (plan.stream_bytes + (1 << 20)).to_string();
    let (_executor, _) = spawn_server(
        &[
            "--remote",
            &registry,
            "--environment-id",
            "bench",
            "--retain-bytes",
            &retain,
        ],
        false,
    )?;
    let (_ws, ws_url) = spawn_server(&["--listen", "ws://127.0.0.1:0"], true)?;
    let noise = format!("noise+http://127.0.0.1:{relay_port}/bench");
    // Connect (registry, relay, handshake, initialize) until the executor
    // is there, then time it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::new(ServerCommand::parse(&noise)?)
            .session_id()
            .await
        {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => return Err(err.into()),
        }
    }
    let mut connects = Vec::new();
    let mut ws_connects = Vec::new();
    let mut first_bytes = Vec::new();
    let mut ws_first_bytes = Vec::new();
    for i in 0..if once { plan.cold_starts } else { 0 } {
        for (address, connect, first) in [
            (&noise, &mut connects, &mut first_bytes),
            (&ws_url, &mut ws_connects, &mut ws_first_bytes),
        ] {
            let client = Client::new(ServerCommand::parse(address)?.json_only());
            let t = Instant::now();
            client.session_id().await?;
            connect.push(ms(t.elapsed()));
            let t = Instant::now();
            let mut process = client
                .start(StartOptions::new(format!("f{i}"), ["echo", "x"]).cwd("/"))
                .await?;
            next_output(&mut process).await?;
            first.push(ms(t.elapsed()));
            client.shutdown().await;
        }
    }
    if once {
        rows.push(row(
            "connect over Noise+relay (registry, WebSocket, handshake, initialize)",
            "ms",
            connects,
            Some(ws_connects),
            "baseline: the same connect and initialize over plain ws://".into(),
        ));
        rows.push(row(
            "time to first output byte over Noise+relay (process/start `echo`)",
            "ms",
            first_bytes,
            Some(ws_first_bytes),
            "baseline: the same over plain ws://".into(),
        ));
    }
    // Throughput: Noise+relay against plain ws:// and a pipe.
    let argv = head(plan.stream_bytes);
    let (mut over_noise, mut over_ws, mut piped) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..plan.stream_runs {
        for (address, samples) in [(&noise, &mut over_noise), (&ws_url, &mut over_ws)] {
            let client = Client::new(wired(args, ServerCommand::parse(address)?));
            client.session_id().await?;
            let t = Instant::now();
            let got = drain(&client, format!("t{run}"), argv.clone()).await?;
            samples.push(mb_per_s(got, t.elapsed()));
            client.shutdown().await;
        }
        let t = Instant::now();
        let got = direct(&argv).await?;
        piped.push(mb_per_s(got, t.elapsed()));
    }
    let size = format!("{} MiB", plan.stream_bytes >> 20);
    rows.push(row(
        &format!("output throughput over Noise+relay ({size})"),
        "MB/s",
        over_noise,
        Some(over_ws.clone()),
        "baseline: the same notifications over plain ws:// (target: ratio >= 0.6)".into(),
    ));
    rows.push(row(
        &format!("output throughput over plain ws:// ({size})"),
        "MB/s",
        over_ws,
        Some(piped),
        "baseline: the same command through a plain pipe".into(),
    ));
    if !once {
        return Ok(rows);
    }
    // Reconnect: a ticker's stream is cut; the client opens a new stream
    // (a new bundle, handshake) and resumes the session.
    let resumed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let told = resumed.clone();
    let client = Client::new(ServerCommand::parse(&noise)?.json_only()).with_notices(move |n| {
        if matches!(n, exec_server::client::Notice::Reconnected { .. }) {
            told.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let mut process = client.start(ticker()).await?;
    let mut samples = Vec::new();
    for _ in 0..plan.reconnects {
        next_output(&mut process).await?;
        resumed.store(false, std::sync::atomic::Ordering::SeqCst);
        let t = Instant::now();
        forwarder.cut();
        // Output already on its way may still arrive: the byte counted is
        // the first one after the session was resumed on a new stream.
        loop {
            next_output(&mut process).await?;
            if resumed.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
        }
        samples.push(ms(t.elapsed()));
    }
    let _ = process.terminate().await;
    client.shutdown().await;
    rows.push(row(
        "reconnect over Noise+relay (stream cut to next output byte)",
        "ms",
        samples,
        None,
        "a new bundle, WebSocket and handshake, then initialize{resumeSessionId} (target: < 50 ms)"
            .into(),
    ));
    Ok(rows)
}
