//! A lane runs blocking jobs one after another on blocking threads, in the
//! order they were queued: a connection's filesystem requests take effect
//! in arrival order without holding up its other requests.

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send>;

pub struct Lane {
    tx: mpsc::UnboundedSender<Job>,
}

impl Lane {
    /// Start a lane; call from within the runtime.
    pub fn start() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                if let Err(err) = tokio::task::spawn_blocking(job).await {
                    tracing::error!("a filesystem job failed: {err}");
                }
            }
        });
        Lane { tx }
    }

    /// Queue `job` now; the returned future yields its result (`None` if the
    /// job could not run).
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Option<T>> + Send + 'static {
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self.tx.send(Box::new(move || {
            let _ = done_tx.send(job());
        }));
        async move { done_rx.await.ok() }
    }
}
