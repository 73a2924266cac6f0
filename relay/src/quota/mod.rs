//! Send quotas: tenant limits on accepted mail (ingress) and pacing of outbound
//! mail (egress), counted in the queue store so every relay process shares them.
//!
//! - [`config`]: the `quotas:` section of the relay config (what the operator's
//!   `SendQuota` resources render into).
//! - [`glob`], [`window`], [`ingress`]: pure logic — patterns, the bucketed
//!   sliding window ("never more than N in any rolling window"), which quotas a
//!   message falls under with what key and cost, and the SMTP refusals.
//! - [`store`]: the [`store::CounterStore`] trait; [`redis`] (one Lua round trip per
//!   check, shared by all relays) and [`embedded`] (in-process) implement it.
//! - [`engine`]: [`Quotas`], what the SMTP session, the connection task, the delivery
//!   scheduler ([`gate`]) and the admin API ([`admin`], JSON in [`usage`]) ask.
//! - [`reload`]: new quotas on SIGHUP or file change, counters kept.
//! - [`metrics`]: Prometheus families.
//! - [`egress`]: pacing of outbound delivery (GCRA plus an in-flight sliding cap,
//!   shared connection leases, rate-limit back-off).

pub mod admin;
/// The `quotas:` section lives with the rest of the config (a leaf); kept here under
/// its old name so the quota code reads `config::QuotaConfig`.
pub use crate::config::quota as config;
pub mod egress;
pub mod embedded;
pub mod engine;
pub mod gate;
/// Quota `match` patterns: their syntax is the config's, so the matcher lives there.
pub use crate::config::glob;
pub mod ingress;
pub mod metrics;
pub mod redis;
pub mod reload;
pub mod store;
pub mod usage;
pub mod window;

pub use engine::{Admission, Charged, Quotas, Release};
pub use gate::{Admitted, DeferGate, DispatchHook};
pub use ingress::{IngressFacts, IngressPolicy, Refusal};
