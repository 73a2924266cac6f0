//! Where quota counters live: [`CounterStore`], implemented in Redis (shared by
//! every relay process, [`super::redis`]) and in-process ([`super::memory`]).
//!
//! Both run the sliding window of [`super::window`] per (quota, window, key)
//! counter, so they give the same answers; `tests/it/quota_store.rs` checks that on
//! random request sequences.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::window::{WindowCheck, WindowSpec};
use crate::queue::QueuedMessage;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("quota store unavailable: {0}")]
    Unavailable(String),
    #[error("quota store timed out after {0:?}")]
    Timeout(Duration),
    /// A check stored its message in the same call (a guarded enqueue), and the
    /// queue store refused to grow: not the quota's doing, and said as such.
    #[error("queue store full: {0}")]
    Full(String),
    #[error("quota store answered nonsense: {0}")]
    Corrupt(String),
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One counter family to check and charge: every window of one quota for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub quota: String,
    pub key: String,
    pub cost: u64,
    pub windows: Vec<WindowSpec>,
}

impl ChargeRequest {
    /// How long the key index of the quota must remember this key.
    pub fn index_ttl_ms(&self) -> u64 {
        self.windows
            .iter()
            .map(WindowSpec::ttl_ms)
            .max()
            .unwrap_or(1)
    }
}

/// The answer to [`CounterStore::check_and_charge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOutcome {
    /// Every window of every request fit, and all were charged.
    pub allowed: bool,
    /// The store's clock at the check (ms since the epoch): the time of the charge,
    /// and the clock `retry_at`/`free_at` are on.
    pub now: u64,
    /// Per request, per window (in request order).
    pub checks: Vec<Vec<WindowCheck>>,
}

/// Usage of one counter as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterUsage {
    pub used: u64,
    /// When the oldest units counted now stop counting (`now` when none is).
    pub resets_at: u64,
}

/// The answer to [`CounterStore::usage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub now: u64,
    /// Per key, per window.
    pub keys: Vec<Vec<CounterUsage>>,
}

/// Keys scanned at most when listing a per-key quota's busiest keys.
pub const MAX_KEYS_SCANNED: usize = 10_000;

/// Quota counters. `at` overrides the store's clock (tests and simulations);
/// production passes `None` (the Redis store then uses Redis `TIME`, one clock for
/// every relay process).
pub trait CounterStore: Send + Sync + 'static {
    fn backend(&self) -> &'static str;

    /// Atomically checks every window of every request and, only if all fit,
    /// charges every one; a refused check charges nothing.
    fn check_and_charge<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        at: Option<u64>,
    ) -> StoreFuture<'a, ChargeOutcome>;

    /// Checks and charges `reqs` and, only if all fit, stores `msg` in the queue,
    /// atomically in one round trip: when the store shares the queue's connection and
    /// the queue allows it (standalone Redis). `None` when it cannot: then the caller
    /// checks, and enqueues after.
    fn check_charge_enqueue<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        msg: &'a QueuedMessage,
    ) -> Option<StoreFuture<'a, ChargeOutcome>> {
        let _ = (reqs, msg);
        None
    }

    /// Takes back a charge made at `charged_at` (the outcome's `now`), as far as
    /// its units still count.
    fn refund<'a>(&'a self, reqs: &'a [ChargeRequest], charged_at: u64) -> StoreFuture<'a, ()>;

    /// Usage of `quota`'s counters for each key, each window; nothing changes.
    fn usage<'a>(
        &'a self,
        quota: &'a str,
        keys: &'a [String],
        windows: &'a [WindowSpec],
        at: Option<u64>,
    ) -> StoreFuture<'a, UsageReport>;

    /// Keys of `quota` charged within `window` (its longest), with their usage in
    /// it; at most [`MAX_KEYS_SCANNED`] of the most recently charged are looked at.
    fn active_keys<'a>(
        &'a self,
        quota: &'a str,
        window: WindowSpec,
        at: Option<u64>,
    ) -> StoreFuture<'a, Vec<(String, u64)>>;
}
