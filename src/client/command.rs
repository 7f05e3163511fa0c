//! How to start a server, and a command line split the way a shell does.

use std::ffi::OsString;
use std::path::PathBuf;

use super::ClientError;

/// How to start a server: a program, its arguments, and optionally extra
/// environment and a working directory.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The program (looked up in `PATH` when it has no `/`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Variables added to its environment.
    pub env: Vec<(OsString, OsString)>,
    /// Its working directory (default: this process's).
    pub cwd: Option<PathBuf>,
    /// Connect to a server listening on this Unix socket instead of
    /// starting one (`unix:PATH`).
    pub socket: Option<PathBuf>,
    /// Connect to a server listening on this WebSocket address instead of
    /// starting one (`ws://IP:PORT`, with `?token=T` when the server wants
    /// a token).
    pub url: Option<String>,
    /// For a WebSocket server: how often the client pings it; a server
    /// that answers nothing for two of these is taken as lost (default
    /// 30 s). This notices a connection that died without a word.
    pub keepalive: Option<std::time::Duration>,
    /// Ask the server for output as binary frames (default true; a server
    /// that does not offer them sends base64 JSON as always).
    pub binary_frames: bool,
    /// How long to keep trying to resume a lost session before giving up
    /// (default 30 s; 75 s while the server says the session is still
    /// attached to a connection it has not seen die).
    pub reconnect_for: Option<std::time::Duration>,
    /// For a Noise address (`noise+http://…`): the registry's bearer token
    /// (default: `CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN`, read at connect).
    pub registry_token: Option<RegistryToken>,
}

/// A registry bearer token: never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryToken(pub String);

impl std::fmt::Debug for RegistryToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryToken(<redacted>)")
    }
}

impl ServerCommand {
    /// `program` with no arguments.
    pub fn new(program: impl Into<OsString>) -> Self {
        ServerCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            socket: None,
            url: None,
            keepalive: None,
            binary_frames: true,
            reconnect_for: None,
            registry_token: None,
        }
    }

    /// Never ask for binary frames: output comes as base64 JSON
    /// notifications (for comparing the two, or a proxy that wants text).
    pub fn json_only(mut self) -> Self {
        self.binary_frames = false;
        self
    }

    /// Add an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Add a variable to the server's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Start the server in `dir`.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Split a command line the way a POSIX shell splits words: whitespace
    /// separates, single quotes keep everything, double quotes and
    /// backslashes escape. No expansion happens.
    pub fn parse(line: &str) -> Result<Self, ClientError> {
        if let Some(path) = line
            .trim()
            .strip_prefix("unix://")
            .or_else(|| line.trim().strip_prefix("unix:"))
        {
            return Ok(ServerCommand::unix(path));
        }
        if line.trim().starts_with("ws://") {
            return Ok(ServerCommand::ws(line.trim()));
        }
        if line.trim().starts_with("noise+") {
            return ServerCommand::noise(line.trim());
        }
        let words = split_words(line)?;
        let mut words = words.into_iter();
        let program = words
            .next()
            .ok_or_else(|| ClientError::InvalidCommand("the command is empty".into()))?;
        let mut command = ServerCommand::new(program);
        command.args = words.map(OsString::from).collect();
        Ok(command)
    }

    /// A server listening on the Unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut command = ServerCommand::new(format!("unix:{}", path.display()));
        command.socket = Some(path);
        command
    }

    /// A server listening on the WebSocket address `url` (`ws://IP:PORT`).
    pub fn ws(url: impl Into<String>) -> Self {
        let url = url.into();
        let mut command = ServerCommand::new(&url);
        command.url = Some(url);
        command
    }

    /// An executor behind a relay: `noise+http://HOST:PORT/ENVIRONMENT_ID`
    /// (or `noise+https://`). Each connection asks the registry there for
    /// a bundle, and runs the Noise handshake with the executor's pinned
    /// key; the registry token is [`ServerCommand::registry_token`], by
    /// default `CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN`.
    pub fn noise(address: impl Into<String>) -> Result<Self, ClientError> {
        let address = address.into();
        #[cfg(feature = "remote")]
        super::noise::Target::parse(&address).map_err(ClientError::InvalidCommand)?;
        #[cfg(not(feature = "remote"))]
        return Err(ClientError::InvalidCommand(format!(
            "{address}: this build has no remote executors (the `remote` feature)"
        )));
        #[cfg(feature = "remote")]
        {
            let mut command = ServerCommand::new(&address);
            command.url = Some(address);
            Ok(command)
        }
    }

    /// The Noise environment the reference orchestrator's variables name
    /// (`CODEX_EXEC_SERVER_NOISE_REGISTRY_URL`, `..._ENVIRONMENT_ID`,
    /// `..._AUTH_TOKEN`): `None` when none is set, an error when only some
    /// are.
    pub fn from_env() -> Option<Result<Self, ClientError>> {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = get("CODEX_EXEC_SERVER_NOISE_REGISTRY_URL");
        let id = get("CODEX_EXEC_SERVER_NOISE_ENVIRONMENT_ID");
        let token = get("CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN");
        match (url, id, token) {
            (None, None, None) => None,
            (Some(url), Some(id), Some(token)) => Some(
                ServerCommand::noise(format!(
                    "noise+{}/{}",
                    url.trim().trim_end_matches('/'),
                    id.trim()
                ))
                .map(|c| c.registry_token(token)),
            ),
            _ => Some(Err(ClientError::InvalidCommand(
                "Noise environment requires CODEX_EXEC_SERVER_NOISE_REGISTRY_URL, \
                 CODEX_EXEC_SERVER_NOISE_ENVIRONMENT_ID, and CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN"
                    .into(),
            ))),
        }
    }

    /// The registry bearer token of a Noise address.
    pub fn registry_token(mut self, token: impl Into<String>) -> Self {
        self.registry_token = Some(RegistryToken(token.into()));
        self
    }

    /// Keep trying to resume a lost session for `how_long` (see
    /// [`ServerCommand::reconnect_for`]).
    pub fn reconnect_for(mut self, how_long: std::time::Duration) -> Self {
        self.reconnect_for = Some(how_long);
        self
    }

    /// Ping a WebSocket server every `every` (see [`ServerCommand::keepalive`]).
    pub fn keepalive(mut self, every: std::time::Duration) -> Self {
        self.keepalive = Some(every);
        self
    }

    /// Whether a lost connection can be resumed: a socket, a WebSocket, or a
    /// command that runs the server with `--persist` (its daemon keeps the
    /// session while the command is started again).
    pub fn resumable(&self) -> bool {
        self.socket.is_some()
            || self.url.is_some()
            || self.args.iter().any(|a| {
                let a = a.to_string_lossy();
                a == "--persist" || a.starts_with("--persist=") || a.contains(" --persist")
            })
    }

    pub(super) fn display(&self) -> String {
        if let Some(url) = &self.url {
            // Never show a token.
            return url.split('?').next().unwrap_or(url).to_string();
        }
        if let Some(path) = &self.socket {
            return format!("unix:{}", path.display());
        }
        let mut text = self.program.to_string_lossy().into_owned();
        for arg in &self.args {
            text.push(' ');
            text.push_str(&arg.to_string_lossy());
        }
        text
    }
}

fn split_words(line: &str) -> Result<Vec<String>, ClientError> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => {
                            return Err(ClientError::InvalidCommand(
                                "unclosed single quote".into(),
                            ));
                        }
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => {
                                return Err(ClientError::InvalidCommand(
                                    "unclosed double quote".into(),
                                ));
                            }
                        },
                        Some(c) => w.push(c),
                        None => {
                            return Err(ClientError::InvalidCommand(
                                "unclosed double quote".into(),
                            ));
                        }
                    }
                }
            }
            '\\' => {
                let w = word.get_or_insert_with(String::new);
                if let Some(c) = chars.next() {
                    w.push(c);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"ssh -p 22 'host name' "a \"b\"" c\ d"#).unwrap(),
            vec!["ssh", "-p", "22", "host name", "a \"b\"", "c d"]
        );
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn addresses_are_recognised_and_a_token_is_never_shown() {
        let ws = ServerCommand::parse(" ws://127.0.0.1:9/?token=secret ").unwrap();
        assert_eq!(ws.url.as_deref(), Some("ws://127.0.0.1:9/?token=secret"));
        assert!(ws.resumable());
        assert_eq!(ws.display(), "ws://127.0.0.1:9/");
        let unix = ServerCommand::parse("unix:/run/x.sock").unwrap();
        assert_eq!(
            unix.socket.as_deref(),
            Some(std::path::Path::new("/run/x.sock"))
        );
        assert!(unix.resumable());
        assert!(
            !ServerCommand::parse("exec-server --stdio")
                .unwrap()
                .resumable()
        );
    }
}
