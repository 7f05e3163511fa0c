//! `--concurrent-requests N`: at most N of a connection's ordinary
//! requests run at once, and they start in the order they arrived.
//!
//! A turn is taken when the request is read (synchronously, so arrival
//! order is the queue's order, whatever order the tasks that wait on their
//! turns are polled in) and waited for by the task that serves it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The turns of one connection.
pub struct Turns {
    state: Arc<Mutex<State>>,
}

struct State {
    free: usize,
    waiting: VecDeque<(oneshot::Sender<Permit>, usize)>,
    /// Bytes of the requests in `waiting` (their messages).
    waiting_bytes: usize,
}

/// Bytes of requests one connection may have waiting for a turn; past
/// them, ordinary requests are refused (retryable) while control requests
/// go on being read, so the one that ends a long wait always gets in.
pub const WAITING_BUDGET: usize = 64 << 20;

/// The right to run; the next waiter gets it when this is dropped.
pub struct Permit {
    /// `None` for a permit that came back from a waiter that gave up.
    state: Option<Arc<Mutex<State>>>,
}

impl Turns {
    /// `limit` requests at once (at least one).
    pub fn new(limit: usize) -> Self {
        Turns {
            state: Arc::new(Mutex::new(State {
                free: limit.max(1),
                waiting: VecDeque::new(),
                waiting_bytes: 0,
            })),
        }
    }

    /// Take a place in the queue now for a request of `size` bytes; the
    /// future yields the permit when every request queued before has
    /// started and one of the `limit` places is free (`None` only if the
    /// queue went away meanwhile: the connection is ending). A future
    /// dropped while it waits gives its place up. Refused when the
    /// requests already waiting hold [`WAITING_BUDGET`] bytes.
    pub fn take(
        &self,
        size: usize,
    ) -> Result<impl Future<Output = Option<Permit>> + Send + 'static, crate::error::Error> {
        let mut state = lock(&self.state);
        if !state.waiting.is_empty() && state.waiting_bytes + size > WAITING_BUDGET {
            return Err(crate::error::Error::TurnsFull {
                waiting: state.waiting_bytes,
                limit: WAITING_BUDGET,
            });
        }
        let ready = if state.free > 0 && state.waiting.is_empty() {
            state.free -= 1;
            Ok(Permit {
                state: Some(self.state.clone()),
            })
        } else {
            let (tx, rx) = oneshot::channel();
            state.waiting.push_back((tx, size));
            state.waiting_bytes += size;
            Err(rx)
        };
        Ok(async move {
            match ready {
                Ok(permit) => Some(permit),
                Err(rx) => rx.await.ok(),
            }
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(shared) = self.state.take() else {
            return;
        };
        let mut state = lock(&shared);
        // Hand the place to the first waiter still waiting.
        while let Some((next, size)) = state.waiting.pop_front() {
            state.waiting_bytes -= size;
            let permit = Permit {
                state: Some(shared.clone()),
            };
            match next.send(permit) {
                Ok(()) => return,
                // That waiter gave up; its permit comes back, emptied so
                // that dropping it does not come here again.
                Err(mut permit) => permit.state = None,
            }
        }
        state.free += 1;
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_start_in_arrival_order_and_at_most_limit_at_once() {
        let turns = Turns::new(2);
        let first = turns.take(1).unwrap().await.unwrap();
        let second = turns.take(1).unwrap().await.unwrap();
        let third = turns.take(1).unwrap();
        let fourth = turns.take(1).unwrap();
        let given_up = turns.take(1).unwrap();
        let fifth = turns.take(1).unwrap();
        drop(given_up);
        // The fourth was polled first, but the third came first.
        let fourth = tokio::spawn(fourth);
        tokio::task::yield_now().await;
        assert!(!fourth.is_finished());
        drop(first);
        let third = third.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!fourth.is_finished());
        drop(second);
        let fourth = fourth.await.unwrap().unwrap();
        drop(third);
        // The one that gave up is skipped.
        let fifth = fifth.await.unwrap();
        drop((fourth, fifth));
        assert_eq!(lock(&turns.state).free, 2);
        assert_eq!(lock(&turns.state).waiting_bytes, 0);
    }

    #[tokio::test]
    async fn waiting_bytes_are_bounded_but_a_free_place_is_always_taken() {
        let turns = Turns::new(1);
        // A free place: taken whatever the size.
        let running = turns.take(WAITING_BUDGET * 2).unwrap().await.unwrap();
        // The first waiter too; then the budget counts.
        let first = turns.take(WAITING_BUDGET).unwrap();
        assert!(turns.take(1).is_err());
        drop(running);
        let first = first.await.unwrap();
        let second = turns.take(WAITING_BUDGET).unwrap();
        drop(first);
        drop(second.await.unwrap());
    }
}
