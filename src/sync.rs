//! The one mutex helper every part uses.

/// Lock a mutex, ignoring poisoning: every critical section here leaves its
/// data consistent, so one panicked task must not take the server down.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
