//! What ends a session's wait for input other than the input itself: graceful
//! shutdown (draining, then closing) and eviction for a newcomer.
//!
//! Every read of a session races these. Waiting on the shutdown `watch` channels and
//! the eviction `Notify` meant registering (and removing) a waiter under their locks
//! on each of the ~10 reads of a message, several thousand instructions each time.
//! A [`Wake`] is one atomic word and one waker slot per session: polling it on a
//! read costs a few atomic operations. Shutdown raises every registered session's
//! wake through [`Wakes`]; eviction raises the evicted session's own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;

use futures_util::task::AtomicWaker;

/// Graceful shutdown began: idle sessions end.
pub const DRAINING: u8 = 1;
/// The grace period is over: every session ends.
pub const CLOSING: u8 = 2;
/// The session was closed to admit another.
pub const EVICTED: u8 = 4;

/// One session's raised conditions and the task to wake when one is raised.
#[derive(Debug, Default)]
pub struct Wake {
    raised: AtomicU8,
    waker: AtomicWaker,
}

impl Wake {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises `bits` (they stay raised) and wakes the task that last polled.
    pub fn raise(&self, bits: u8) {
        self.raised.fetch_or(bits, Ordering::SeqCst);
        self.waker.wake();
    }

    /// What is raised, after registering `cx` to be woken by the next raise. The
    /// waker is registered before the bits are read, so a raise between the two is
    /// seen now or wakes the task.
    pub fn poll(&self, cx: &mut Context<'_>) -> u8 {
        self.waker.register(cx.waker());
        self.raised.load(Ordering::SeqCst)
    }

    /// What is raised.
    pub fn raised(&self) -> u8 {
        self.raised.load(Ordering::SeqCst)
    }
}

/// The wakes of all open sessions, so that shutdown can raise them.
#[derive(Debug, Default)]
pub struct Wakes {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    all: HashMap<u64, Arc<Wake>>,
    /// Raised for every session so far: a session registered later starts with it.
    raised: u8,
}

impl Wakes {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `wake` until the returned guard is dropped, raising at once what
    /// shutdown has already raised. Under the registry's lock, so a raise either
    /// sees it registered or is seen by it here.
    pub fn register(self: &Arc<Self>, wake: Arc<Wake>) -> Registered {
        let mut r = self.lock();
        if r.raised != 0 {
            wake.raise(r.raised);
        }
        let id = r.next;
        r.next += 1;
        r.all.insert(id, Arc::clone(&wake));
        Registered {
            wakes: Arc::clone(self),
            id,
            wake,
        }
    }

    /// Raises `bits` for every session, open now or registered later.
    pub fn raise(&self, bits: u8) {
        let mut r = self.lock();
        r.raised |= bits;
        for wake in r.all.values() {
            wake.raise(bits);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().all.len()
    }
}

/// A session's place in [`Wakes`]; leaves it when dropped.
#[derive(Debug)]
pub struct Registered {
    wakes: Arc<Wakes>,
    id: u64,
    pub wake: Arc<Wake>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.wakes.lock().all.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits until `bits` are raised on `wake`, as a session's read does.
    async fn raised(wake: &Wake, bits: u8) -> u8 {
        std::future::poll_fn(|cx| {
            let r = wake.poll(cx);
            if r & bits != 0 {
                std::task::Poll::Ready(r)
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    #[tokio::test]
    async fn shutdown_wakes_a_waiting_session_and_reaches_sessions_registered_later() {
        let wakes = Wakes::new();
        let first = wakes.register(Arc::new(Wake::new()));
        let waiting = {
            let wake = Arc::clone(&first.wake);
            tokio::spawn(async move { raised(&wake, DRAINING | CLOSING).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "nothing raised yet");
        wakes.raise(DRAINING);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting session is woken")
            .unwrap();
        assert_eq!(got, DRAINING);
        // A session that starts during the drain sees it at once.
        let later = wakes.register(Arc::new(Wake::new()));
        assert_eq!(later.wake.raised(), DRAINING);
        wakes.raise(CLOSING);
        assert_eq!(first.wake.raised(), DRAINING | CLOSING);
        assert_eq!(later.wake.raised(), DRAINING | CLOSING);
        assert_eq!(wakes.len(), 2);
        drop(first);
        drop(later);
        assert_eq!(wakes.len(), 0, "a closed session leaves the registry");
    }

    #[tokio::test]
    async fn an_eviction_wakes_only_its_session() {
        let wakes = Wakes::new();
        let a = wakes.register(Arc::new(Wake::new()));
        let b = wakes.register(Arc::new(Wake::new()));
        let waiting = {
            let wake = Arc::clone(&a.wake);
            tokio::spawn(async move { raised(&wake, EVICTED).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.wake.raise(EVICTED);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the evicted session is woken")
            .unwrap();
        assert_eq!(got, EVICTED);
        assert_eq!(b.wake.raised(), 0);
    }
}
