//! Waiting for a state instead of sleeping for a guessed time: a fixed sleep is
//! either too short on a loaded machine (a flaky test) or too long everywhere else
//! (a slow one). These poll a condition until it holds or a deadline passes, and
//! then fail naming what was awaited.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is checked: short against the seconds a test waits, long
/// enough not to busy the two cores of a CI machine.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns `Some`, and returns that; panics naming `what` when
/// `timeout` passes first.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `cond` until it holds; panics naming `what` when `timeout` passes first.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()))
}

/// [`wait_until`] for a condition that awaits (an API call, a store read), on the
/// test's runtime: the runtime keeps running other tasks between the checks.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
