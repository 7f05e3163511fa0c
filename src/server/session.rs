//! Sessions: the server-wide registry, attaching and detaching connections,
//! and expiry of detached sessions.

use crate::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::process::{Attachment, Limits, ProcessTable, container::Containment};
use crate::transport::Outbound;

/// A session owns its processes; at most one connection is attached.
pub struct Session {
    pub id: String,
    pub processes: Arc<ProcessTable>,
    attachment: Attachment,
    /// Bumped on every attach, so a stale expiry timer knows it is stale.
    generation: Mutex<u64>,
}

impl Session {
    /// Whether connection `conn` is the one attached.
    pub fn is_attached_to(&self, conn: u64) -> bool {
        lock(&self.attachment)
            .as_ref()
            .is_some_and(|(id, _)| *id == conn)
    }

    fn attach(&self, conn: u64, outbound: Outbound) {
        *lock(&self.attachment) = Some((conn, outbound));
        *lock(&self.generation) += 1;
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
        let attachment: Attachment = Arc::new(Mutex::new(None));
        let session = Arc::new(Session {
            id: uuid_v4(),
            processes: ProcessTable::new(self.limits, attachment.clone(), self.containment.clone()),
            attachment,
            generation: Mutex::new(0),
        });
        session.attach(conn, outbound);
        self.map().insert(session.id.clone(), session.clone());
        session
    }

    /// Reattach a detached session to connection `conn`.
    pub fn resume(&self, id: &str, conn: u64, outbound: Outbound) -> Result<Arc<Session>> {
        let session = self
            .map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownSession(id.to_string()))?;
        let mut slot = lock(&session.attachment);
        if slot.is_some() {
            return Err(Error::SessionAttached(id.to_string()));
        }
        *slot = Some((conn, outbound));
        drop(slot);
        *lock(&session.generation) += 1;
        Ok(session)
    }

    /// Detach connection `conn` from `session`; the session expires after
    /// the detached TTL unless it is resumed first.
    pub fn detach(self: &Arc<Self>, session: &Arc<Session>, conn: u64) {
        {
            let mut slot = lock(&session.attachment);
            if slot.as_ref().is_none_or(|(id, _)| *id != conn) {
                return;
            }
            *slot = None;
        }
        let generation = *lock(&session.generation);
        let registry = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            tokio::time::sleep(registry.detached_ttl).await;
            let still_detached = lock(&session.attachment).is_none();
            let same = *lock(&session.generation) == generation;
            if still_detached && same {
                tracing::info!(session = %session.id, "detached session expired");
                registry.map().remove(&session.id);
                session.processes.kill_all();
            }
        });
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
            *lock(&session.attachment) = None;
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
    #[test]
    fn uuid_has_version_and_variant_bits() {
        let id = super::uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, super::uuid_v4());
    }
}
