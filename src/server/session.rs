//! Sessions: the server-wide registry, attaching and detaching connections,
//! and expiry of detached sessions.

use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::process::{Attached, Attachment, Limits, ProcessTable, container::Containment};
use crate::transport::Outbound;

/// A session owns its processes; at most one connection is attached.
pub struct Session {
    pub id: String,
    pub processes: Arc<ProcessTable>,
    /// Its `fs/watch`es: they live, and keep their changes, as long as it.
    pub watches: Arc<crate::watch::Watches>,
    /// The attached connection and the attach count, under one lock.
    attachment: Attachment,
}

impl Session {
    /// Whether connection `conn` is the one attached.
    pub fn is_attached_to(&self, conn: u64) -> bool {
        lock(&self.attachment)
            .connection
            .as_ref()
            .is_some_and(|(id, _)| *id == conn)
    }

    /// The connection attached now, whoever it is when asked (for the
    /// network proxy's questions and audit records).
    pub fn peer(&self) -> crate::net::Peer {
        let attachment = self.attachment.clone();
        Arc::new(move || {
            lock(&attachment)
                .connection
                .as_ref()
                .map(|(_, outbound)| outbound.clone())
        })
    }

    fn attach(&self, conn: u64, outbound: Outbound) {
        let mut attached = lock(&self.attachment);
        attached.connection = Some((conn, outbound));
        attached.generation += 1;
    }
}

/// Every session of one server process.
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    limits: Limits,
    containment: Arc<Containment>,
    detached_ttl: Duration,
}

impl Registry {
    pub fn new(limits: Limits, containment: Arc<Containment>, detached_ttl: Duration) -> Self {
        Registry {
            sessions: Mutex::new(HashMap::new()),
            limits,
            containment,
            detached_ttl,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        lock(&self.sessions)
    }

    /// A new session attached to connection `conn`.
    pub fn create(&self, conn: u64, outbound: Outbound) -> Arc<Session> {
        let attachment: Attachment = Arc::new(Mutex::new(Attached::default()));
        let session = Arc::new(Session {
            id: uuid_v4(),
            processes: ProcessTable::new(self.limits, attachment.clone(), self.containment.clone()),
            watches: crate::watch::Watches::new(attachment.clone()),
            attachment,
        });
        session.attach(conn, outbound);
        self.map().insert(session.id.clone(), session.clone());
        crate::audit::record(
            "session.attach",
            || serde_json::json!({"session": session.id, "connection": conn, "resumed": false}),
        );
        session
    }

    /// Reattach a detached session to connection `conn`.
    pub fn resume(&self, id: &str, conn: u64, outbound: Outbound) -> Result<Arc<Session>> {
        let session = self
            .map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownSession(id.to_string()))?;
        let mut attached = lock(&session.attachment);
        if attached.expired {
            return Err(Error::UnknownSession(id.to_string()));
        }
        if attached.connection.is_some() {
            return Err(Error::SessionAttached(id.to_string()));
        }
        attached.connection = Some((conn, outbound));
        attached.generation += 1;
        drop(attached);
        crate::audit::record(
            "session.attach",
            || serde_json::json!({"session": session.id, "connection": conn, "resumed": true}),
        );
        Ok(session)
    }

    /// Detach connection `conn` from `session`; the session expires after
    /// the detached TTL unless it is resumed first.
    pub fn detach(self: &Arc<Self>, session: &Arc<Session>, conn: u64) {
        let generation = {
            let mut attached = lock(&session.attachment);
            if attached
                .connection
                .as_ref()
                .is_none_or(|(id, _)| *id != conn)
            {
                return;
            }
            attached.connection = None;
            attached.generation
        };
        crate::audit::record(
            "session.detach",
            || serde_json::json!({"session": session.id, "connection": conn}),
        );
        let registry = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            tokio::time::sleep(registry.detached_ttl).await;
            let expired = registry.end_if(&session, |attached| {
                attached.connection.is_none() && attached.generation == generation
            });
            if expired {
                tracing::info!(session = %session.id, "detached session expired");
                crate::audit::record(
                    "session.expire",
                    || serde_json::json!({"session": session.id}),
                );
            }
        });
    }

    /// End `session` now (`session/end`): it can't be resumed, and its
    /// processes are killed, as at expiry.
    pub fn end(&self, session: &Arc<Session>) {
        if self.end_if(session, |_| true) {
            crate::audit::record("session.end", || serde_json::json!({"session": session.id}));
        }
        tracing::debug!(session = %session.id, "session ended by its client");
    }

    /// End `session` if `now` says so of its attachment: decided and
    /// recorded under the attachment's lock, so that a resume either wins
    /// before it or is refused after it; then its processes are killed.
    /// Whether it ended.
    fn end_if(&self, session: &Arc<Session>, now: impl FnOnce(&Attached) -> bool) -> bool {
        {
            let mut attached = lock(&session.attachment);
            if !now(&attached) {
                return false;
            }
            attached.expired = true;
            self.map().remove(&session.id);
        }
        session.processes.kill_all();
        session.watches.stop_all();
        true
    }

    /// Queue `message` (a fresh one each) for every attached connection,
    /// where there is room.
    pub fn tell_all(&self, message: impl Fn() -> crate::jsonrpc::Outgoing) {
        let all: Vec<Arc<Session>> = self.map().values().cloned().collect();
        for session in all {
            if let Some((_, outbound)) = &lock(&session.attachment).connection {
                outbound.send_if_room(message(), 0);
            }
        }
    }

    /// Wait (up to `within`) until every attached connection has written
    /// what it was given: what the server says as it stops must reach the
    /// peers before their connections end.
    pub async fn wait_written(&self, within: Duration) {
        let all: Vec<Arc<Session>> = self.map().values().cloned().collect();
        let outbounds: Vec<Outbound> = all
            .iter()
            .filter_map(|s| {
                lock(&s.attachment)
                    .connection
                    .as_ref()
                    .map(|(_, o)| o.clone())
            })
            .collect();
        let deadline = tokio::time::Instant::now() + within;
        while outbounds.iter().any(|o| o.budget().queued() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether no session exists.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Every session: its id, whether a connection is attached, and its
    /// processes.
    pub fn snapshot(&self) -> Vec<(String, bool, Vec<crate::protocol::ProcessSummary>)> {
        let all: Vec<Arc<Session>> = self.map().values().cloned().collect();
        let mut out: Vec<_> = all
            .iter()
            .map(|s| {
                let attached = lock(&s.attachment).connection.is_some();
                (s.id.clone(), attached, s.processes.list())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Kill every process of every session and wait until all are reaped.
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Session>> = self.map().drain().map(|(_, s)| s).collect();
        for session in &all {
            session.processes.kill_all();
        }
        for session in &all {
            session.processes.wait_reaped().await;
            // Let go of the connection so its writer can finish.
            lock(&session.attachment).connection = None;
        }
    }
}

/// A random (version 4) UUID from the kernel's random source.
fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom fills a valid 16-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        // Fall back to something unique within this process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::output::Retention;

    fn registry(ttl_ms: u64) -> Arc<Registry> {
        let limits = Limits {
            retention: Retention {
                max_bytes: 1024,
                max_chunks: 16,
            },
            closed_retention: Duration::from_secs(1),
        };
        Arc::new(Registry::new(
            limits,
            Arc::new(Containment::for_tests()),
            Duration::from_millis(ttl_ms),
        ))
    }

    fn outbound() -> Outbound {
        Outbound::new(tokio::sync::mpsc::channel(4).0, crate::jsonrpc::encode_line)
    }

    #[tokio::test]
    async fn a_detached_session_is_resumed_once_and_expires_without_a_connection() {
        let registry = registry(100);
        let session = registry.create(1, outbound());
        // Attached elsewhere: retryable refusal.
        assert!(matches!(
            registry.resume(&session.id, 2, outbound()),
            Err(Error::SessionAttached(_))
        ));
        registry.detach(&session, 1);
        let resumed = registry.resume(&session.id, 2, outbound()).unwrap();
        assert!(Arc::ptr_eq(&resumed, &session));
        assert!(session.is_attached_to(2) && !session.is_attached_to(1));
        // The first detach's timer must not expire the resumed session.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(registry.resume(&session.id, 3, outbound()).is_err());
        assert!(session.is_attached_to(2));
        // Detached for longer than the TTL: gone, even for a caller that
        // still holds the session.
        registry.detach(&session, 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(
            registry.resume(&session.id, 4, outbound()),
            Err(Error::UnknownSession(_))
        ));
        assert!(lock(&session.attachment).expired);
    }

    #[tokio::test]
    async fn a_stale_connection_can_not_detach_the_one_that_resumed() {
        let registry = registry(50);
        let session = registry.create(1, outbound());
        registry.detach(&session, 1);
        registry.resume(&session.id, 2, outbound()).unwrap();
        // The old connection ends late: nothing changes.
        registry.detach(&session, 1);
        assert!(session.is_attached_to(2));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(session.is_attached_to(2));
        assert!(!lock(&session.attachment).expired);
    }

    /// Expiry racing a resume, at the TTL's edge, many times: each round
    /// ends one way or the other, never half (a resumed session that is
    /// marked expired, or an expired one that was handed out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expiry_racing_a_resume_ends_one_way_or_the_other() {
        let registry = registry(3);
        let (mut resumed, mut expired) = (0, 0);
        for round in 0..200u64 {
            let session = registry.create(1, outbound());
            registry.detach(&session, 1);
            // Around the TTL (a little before, at, a little after), and
            // well before and well after it so that both outcomes occur.
            let wait = [0, 2_000, 3_000, 4_000, 10_000][(round % 5) as usize];
            tokio::time::sleep(Duration::from_micros(wait)).await;
            match registry.resume(&session.id, 2, outbound()) {
                Ok(again) => {
                    assert!(Arc::ptr_eq(&again, &session));
                    // Whatever the timer does now, it must not end it.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    assert!(session.is_attached_to(2), "round {round}");
                    assert!(!lock(&session.attachment).expired, "round {round}");
                    resumed += 1;
                }
                Err(Error::UnknownSession(_)) => {
                    assert!(lock(&session.attachment).expired, "round {round}");
                    expired += 1;
                }
                Err(other) => panic!("round {round}: {other:?}"),
            }
        }
        // Both outcomes were exercised, or the test raced nothing.
        assert!(
            resumed > 0 && expired > 0,
            "{resumed} resumed, {expired} expired"
        );
    }

    #[test]
    fn uuid_has_version_and_variant_bits() {
        let id = super::uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, super::uuid_v4());
    }
}
