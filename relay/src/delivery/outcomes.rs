//! Writes delivery outcomes to the queue in small batches, as messages finish.
//!
//! A message's outcome (delivered, deferred with its next attempt, bounced) is what
//! keeps it from being sent again: until `finish` is stored, a relay that dies
//! leaves the message leased, and whoever takes it after the lease delivers it once
//! more. Writing each outcome as its transaction ends, rather than when the whole
//! connection is over, keeps that window to the message in flight per connection.
//!
//! One write per message would cost a store round trip (a Redis script, a redb
//! fsync) per message; so outcomes are gathered and written together with
//! [`Queue::finish_batch`]: once `max_messages` are waiting, or the first of them
//! has waited `max_delay`, whichever comes first.
//!
//! At most `max_messages` outcomes are ever accepted and not yet written: a
//! submission waits for room (the connection that delivered it pauses before its
//! next message). So after a kill -9, the messages sent again are at most one per
//! open connection (delivered, reply not yet read) plus `max_messages`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::OutcomeBatchConfig;
use crate::events::log::{EventSink, OutcomeEvents};
use crate::metrics::Metrics;
use crate::queue::{FinishResult, Lease, Leasing, MessageStatus, QueueError};

/// The answer to one submitted outcome, once its batch is written.
pub type Pending = oneshot::Receiver<Result<FinishResult, QueueError>>;

struct Item {
    lease: Lease,
    status: MessageStatus,
    /// Delivery events of this outcome, written with the batch's `finish` (or just
    /// before it).
    events: Vec<mailrelay_admin_api::Event>,
    reply: oneshot::Sender<Result<FinishResult, QueueError>>,
    /// Room in the window, given back when the batch is written.
    _permit: OwnedSemaphorePermit,
}

enum Msg {
    Outcome(Box<Item>),
    /// Write what is waiting now, then answer.
    Flush(oneshot::Sender<()>),
}

/// Handle on the batching task; the task ends when the handle is dropped (after
/// writing what it holds).
pub struct OutcomeWriter {
    tx: mpsc::UnboundedSender<Msg>,
    room: Arc<Semaphore>,
    events: Arc<std::sync::OnceLock<EventSink>>,
}

impl OutcomeWriter {
    pub fn start(queue: Arc<dyn Leasing>, cfg: OutcomeBatchConfig, metrics: Arc<Metrics>) -> Self {
        let max = cfg.max_messages.max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Arc::new(std::sync::OnceLock::new());
        tokio::spawn(run(
            queue,
            max,
            cfg.max_delay,
            metrics,
            Arc::clone(&events),
            rx,
        ));
        OutcomeWriter {
            tx,
            room: Arc::new(Semaphore::new(max)),
            events,
        }
    }

    /// Writes the events given with outcomes to `sink` from now on (once; later
    /// calls are ignored).
    pub fn record_events_with(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    /// Whether outcome events are recorded (so callers build them only then).
    pub fn events_enabled(&self) -> bool {
        self.events.get().is_some()
    }

    /// Hands an outcome to the next batch, waiting while the window is full.
    pub async fn submit(&self, lease: Lease, status: MessageStatus) -> Pending {
        self.submit_with_events(lease, status, Vec::new()).await
    }

    /// [`OutcomeWriter::submit`] with the delivery events of the outcome: they are
    /// written in the batch's `finish` where the queue can, else before it, so a
    /// crash between the two writes delivers again and writes them again (at least
    /// once, never lost).
    pub async fn submit_with_events(
        &self,
        lease: Lease,
        status: MessageStatus,
        events: Vec<mailrelay_admin_api::Event>,
    ) -> Pending {
        let (reply, answer) = oneshot::channel();
        let permit = match Arc::clone(&self.room).acquire_owned().await {
            Ok(p) => p,
            // Never closed; answer rather than panic if it were.
            Err(_) => {
                let _ = reply.send(Err(QueueError::Unavailable("outcome writer closed".into())));
                return answer;
            }
        };
        let item = Item {
            lease,
            status,
            events,
            reply,
            _permit: permit,
        };
        if let Err(mpsc::error::SendError(Msg::Outcome(item))) =
            self.tx.send(Msg::Outcome(Box::new(item)))
        {
            let _ = item.reply.send(Err(QueueError::Unavailable(
                "outcome writer stopped".into(),
            )));
        }
        answer
    }

    /// Writes every outcome submitted so far without waiting for the interval, and
    /// returns once they are written (graceful shutdown).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(
    queue: Arc<dyn Leasing>,
    max: usize,
    max_delay: std::time::Duration,
    metrics: Arc<Metrics>,
    events: Arc<std::sync::OnceLock<EventSink>>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let mut batch: Vec<Item> = Vec::with_capacity(max);
    loop {
        match rx.recv().await {
            None => return,
            Some(Msg::Flush(done)) => {
                let _ = done.send(());
                continue;
            }
            Some(Msg::Outcome(item)) => batch.push(*item),
        }
        // The window opens with its first outcome.
        let deadline = Instant::now() + max_delay;
        let mut trigger = "interval";
        let mut flushed: Vec<oneshot::Sender<()>> = Vec::new();
        let mut closed = false;
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => break,
                Ok(None) => {
                    trigger = "shutdown";
                    closed = true;
                    break;
                }
                Ok(Some(Msg::Outcome(item))) => batch.push(*item),
                Ok(Some(Msg::Flush(done))) => {
                    trigger = "shutdown";
                    flushed.push(done);
                    break;
                }
            }
        }
        if batch.len() >= max {
            trigger = "size";
        }
        write(
            &*queue,
            std::mem::take(&mut batch),
            trigger,
            &metrics,
            events.get(),
        )
        .await;
        for done in flushed {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

async fn write(
    queue: &dyn Leasing,
    mut batch: Vec<Item>,
    trigger: &'static str,
    metrics: &Metrics,
    sink: Option<&EventSink>,
) {
    let n = batch.len();
    let per_item: Vec<Vec<mailrelay_admin_api::Event>> = batch
        .iter_mut()
        .map(|i| std::mem::take(&mut i.events))
        .collect();
    let (items, replies): (Vec<(Lease, MessageStatus)>, Vec<_>) = batch
        .into_iter()
        .map(|i| ((i.lease, i.status), (i.reply, i._permit)))
        .unzip();
    let result = match sink {
        Some(sink) if per_item.iter().any(|e| !e.is_empty()) => {
            write_with_events(queue, items, sink, per_item).await
        }
        _ => queue.finish_batch(items).await,
    };
    match result {
        Ok(results) => {
            metrics.outcome_flush(trigger, n, false);
            for ((reply, _permit), result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            metrics.outcome_flush(trigger, n, true);
            tracing::warn!(error = %e, messages = n, "writing delivery outcomes failed; those messages are sent again after their leases expire");
            let text = e.to_string();
            for (reply, _permit) in replies {
                let _ = reply.send(Err(QueueError::Unavailable(text.clone())));
            }
        }
    }
}

/// Writes a batch's outcomes and their events (`per_item`, by outcome) so that
/// every event is written at least once, whatever fails (see
/// [`crate::events::log`]): in the same atomic write where the queue can, else
/// appended before the outcomes.
async fn write_with_events(
    queue: &dyn Leasing,
    items: Vec<(Lease, MessageStatus)>,
    sink: &EventSink,
    per_item: Vec<Vec<mailrelay_admin_api::Event>>,
) -> Result<Vec<Result<FinishResult, QueueError>>, QueueError> {
    let all = |per_item: Vec<Vec<_>>| per_item.into_iter().flatten().collect::<Vec<_>>();
    if !queue.writes_outcome_events() {
        sink.append_now(&all(per_item)).await;
        return queue.finish_batch(items).await;
    }
    let encoded = match OutcomeEvents::new(per_item.iter().map(Vec::as_slice), sink.max_len()) {
        Ok(e) => e,
        Err(e) => {
            // Not expected (events are plain data); the sink reports what it
            // cannot write.
            tracing::debug!(error = %e, "encoding outcome events failed");
            sink.append_now(&all(per_item)).await;
            return queue.finish_batch(items).await;
        }
    };
    // What was recorded before (an `accepted`) goes first, so one message's events
    // stay in order in the store.
    sink.flush().await;
    let result = queue.finish_batch_with_events(items, &encoded).await;
    match &result {
        // Stored without their events (a full Redis refused them): on their own.
        Ok(_) if encoded.unwritten() => sink.append_now(&all(per_item)).await,
        Ok(_) => sink.written_elsewhere_all(per_item.iter().flatten()),
        // The deliveries happened: their events are written on their own, while
        // the messages, not finished, are delivered (and reported) again.
        Err(_) => sink.append_now(&all(per_item)).await,
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Leased, QueueFuture, QueueId, Store};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Records the size of every batch written.
    #[derive(Default)]
    struct Batches(Mutex<Vec<usize>>);

    impl Store for Batches {
        fn backend(&self) -> &'static str {
            "test"
        }
        fn ping(&self) -> QueueFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    // The writer only ever calls `finish_batch`; the rest of the role is unreachable.
    impl Leasing for Batches {
        fn lease_due(&self, _: u64, _: u64, _: usize, _: &str) -> QueueFuture<'_, Vec<Leased>> {
            unreachable!("the outcome writer never leases")
        }
        fn finish<'a>(&'a self, _: &'a Lease, _: MessageStatus) -> QueueFuture<'a, FinishResult> {
            unreachable!("the outcome writer writes batches")
        }
        fn finish_batch(
            &self,
            items: Vec<(Lease, MessageStatus)>,
        ) -> QueueFuture<'_, Vec<Result<FinishResult, QueueError>>> {
            self.0.lock().unwrap().push(items.len());
            let n = items.len();
            Box::pin(async move { Ok((0..n).map(|_| Ok(FinishResult::Finalized)).collect()) })
        }
        fn renew<'a>(&'a self, _: &'a Lease, _: u64) -> QueueFuture<'a, bool> {
            unreachable!("the outcome writer never renews")
        }
        fn give_back<'a>(&'a self, _: &'a [(Lease, u64)]) -> QueueFuture<'a, ()> {
            unreachable!("the outcome writer never gives back")
        }
    }

    fn item() -> (Lease, MessageStatus) {
        let id = QueueId::generate();
        let status = MessageStatus {
            id: id.clone(),
            rcpts: Vec::new(),
            created_ms: 0,
            next_attempt_ms: None,
            attempts: 1,
            final_at_ms: None,
            leased_until_ms: None,
            delay_warned: false,
        };
        let lease = Lease {
            id,
            token: "t".into(),
            expires_ms: 0,
            head: Default::default(),
        };
        (lease, status)
    }

    fn writer(max: usize, delay: Duration) -> (Arc<Batches>, OutcomeWriter) {
        let q = Arc::new(Batches::default());
        let cfg = OutcomeBatchConfig {
            max_messages: max,
            max_delay: delay,
        };
        let w = OutcomeWriter::start(q.clone(), cfg, Arc::new(Metrics::new()));
        (q, w)
    }

    #[tokio::test]
    async fn a_full_batch_is_written_at_once_and_the_window_stays_bounded() {
        let (q, w) = writer(4, Duration::from_secs(3600));
        let mut pending = Vec::new();
        for _ in 0..8 {
            let (l, s) = item();
            pending.push(w.submit(l, s).await);
        }
        for p in pending {
            assert_eq!(p.await.unwrap().unwrap(), FinishResult::Finalized);
        }
        assert_eq!(*q.0.lock().unwrap(), [4, 4]);
        // A fifth submission must wait while four are unwritten: never more than
        // `max_messages` outcomes are accepted and not yet written.
        assert_eq!(w.room.available_permits(), 4);
    }

    #[tokio::test]
    async fn a_lone_outcome_is_written_after_the_interval() {
        let (q, w) = writer(32, Duration::from_millis(30));
        let started = std::time::Instant::now();
        let (l, s) = item();
        let p = w.submit(l, s).await;
        p.await.unwrap().unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        assert_eq!(*q.0.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn flush_writes_what_waits_without_the_interval() {
        let (q, w) = writer(32, Duration::from_secs(3600));
        let (l, s) = item();
        let p = w.submit(l, s).await;
        tokio::time::timeout(Duration::from_secs(5), w.flush())
            .await
            .expect("flush returns at once");
        assert_eq!(p.await.unwrap().unwrap(), FinishResult::Finalized);
        assert_eq!(*q.0.lock().unwrap(), [1]);
    }
}
