//! `fs/watch` from the client: a [`Watcher`] yields the changes under a
//! path as the server reports them.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Client, ClientError, Conn, Note, uri};

/// One change under a watched path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `created`, `modified`, `removed`, `renamed` or `overflow` (changes
    /// were dropped: look at the tree again).
    pub kind: String,
    /// The path changed (none for `overflow`).
    pub path: Option<PathBuf>,
    /// Where a `renamed` path went.
    pub to_path: Option<PathBuf>,
}

/// A watch started with [`Client::watch`]. On a client that resumes, it
/// follows the session to the new connection and reads back what went
/// by meanwhile.
pub struct Watcher {
    client: Client,
    conn: Arc<Conn>,
    id: String,
    events: mpsc::UnboundedReceiver<Note>,
    /// The seq of the last notification taken.
    seen: u64,
}

impl Client {
    /// `fs/watch`: watch `path` (and, with `recursive`, everything below
    /// it) on the server.
    pub async fn watch(
        &self,
        path: impl Into<PathBuf>,
        recursive: bool,
    ) -> Result<Watcher, ClientError> {
        let conn = self.conn().await?;
        let path = path.into();
        let result = conn
            .call(
                "fs/watch",
                json!({"path": uri(&path), "recursive": recursive}),
            )
            .await?;
        let id = result["watchId"].as_str().unwrap_or_default().to_string();
        let events = conn.subscribe(&watch_key(&id));
        // The first notification comes a window after the first change,
        // long after this subscription; any earlier one would show as a
        // gap and be read back.
        Ok(Watcher {
            client: self.clone(),
            conn,
            id,
            events,
            seen: 0,
        })
    }
}

/// The key notifications of watch `id` are routed by.
pub(crate) fn watch_key(id: &str) -> String {
    format!("watch:{id}")
}

impl Watcher {
    /// The watch's id on the server.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next changes the server reports (a window's worth, or what a
    /// gap or a resume read back), in order. `None` once the connection
    /// is gone and can't be resumed.
    pub async fn next(&mut self) -> Option<Result<Vec<Change>, ClientError>> {
        loop {
            let Some(note) = self.events.recv().await else {
                if !self.client.resumable() {
                    return None;
                }
                // Resume, listen again, and read what went by meanwhile.
                let resumed = async {
                    self.conn = self.client.conn().await?;
                    self.events = self.conn.subscribe(&watch_key(&self.id));
                    self.read_back(u64::MAX).await
                };
                match resumed.await {
                    Ok(changes) if changes.is_empty() => continue,
                    Ok(changes) => return Some(Ok(changes)),
                    Err(err) => return Some(Err(err)),
                }
            };
            let Note::Other(note) = note else {
                continue;
            };
            let seq = note.params["seq"].as_u64().unwrap_or(0);
            if seq <= self.seen {
                continue;
            }
            let mut all = Vec::new();
            if seq > self.seen + 1 {
                match self.read_back(seq).await {
                    Ok(missed) => all = missed,
                    Err(err) => return Some(Err(err)),
                }
            }
            all.extend(changes(&note.params["events"]));
            self.seen = seq;
            return Some(Ok(all));
        }
    }

    /// The retained changes after the last seq taken and before `before`
    /// (`fs/readChanges`), with an `overflow` first when some are gone.
    async fn read_back(&mut self, before: u64) -> Result<Vec<Change>, ClientError> {
        let missed = self
            .conn
            .call(
                "fs/readChanges",
                json!({"watchId": self.id, "afterSeq": self.seen}),
            )
            .await?;
        let mut all = Vec::new();
        if missed["truncated"] == true {
            all.push(Change {
                kind: "overflow".into(),
                path: None,
                to_path: None,
            });
        }
        for batch in missed["changes"].as_array().into_iter().flatten() {
            let seq = batch["seq"].as_u64().unwrap_or(0);
            if seq > self.seen && seq < before {
                all.extend(changes(&batch["events"]));
                self.seen = seq;
            }
        }
        Ok(all)
    }

    /// `fs/unwatch`.
    pub async fn unwatch(self) -> Result<(), ClientError> {
        self.conn.unsubscribe(&watch_key(&self.id));
        self.client
            .conn()
            .await?
            .call("fs/unwatch", json!({"watchId": self.id}))
            .await
            .map(|_| ())
    }
}

fn changes(events: &Value) -> Vec<Change> {
    let path = |v: &Value| v.as_str().and_then(|s| crate::protocol::parse_path(s).ok());
    events
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Change {
            kind: e["kind"].as_str().unwrap_or("").to_string(),
            path: path(&e["path"]),
            to_path: path(&e["toPath"]),
        })
        .collect()
}
