//! Send quotas: tenant limits on accepted mail (ingress) and pacing of outbound
//! mail (egress), counted in the queue store so every relay process shares them.
//! Depends only downward (queue, config, redis_conn): the SMTP session and the
//! delivery scheduler call traits of their own, which thin adapters in
//! `server::quota` implement with the types here.
//!
//! Where to change the quota algorithm:
//! - ingress (accepting mail): [`ingress::model`] (matching, keys, costs,
//!   refusals), [`ingress::window`] (the sliding window, the reference model),
//!   whose twins are [`ingress::memory`] and the Lua in `ingress/lua/` (loaded by
//!   [`ingress::redis`]); [`ingress::engine`] decides per message,
//!   [`ingress::gate`] releases `action: defer` mail at dispatch.
//! - egress (pacing delivery): [`egress::pacer`] (GCRA plus the in-flight sliding
//!   cap, the reference model), whose twins are [`egress::memory`] and the Lua in
//!   `egress/lua/` (loaded by [`egress::redis`]); [`egress`] ties them to
//!   connections, [`egress::backoff`] to rate-limit replies.
//!
//! Shared: [`config`] (the `quotas:` section), [`glob`] (every `match` pattern),
//! [`reply`] (replies as plain values), [`usage`] (the usage API's JSON), [`admin`] (its routes), [`reload`].

pub mod admin;
/// The `quotas:` section lives with the rest of the config (a leaf); kept here under
/// its old name so the quota code reads `config::QuotaConfig`.
pub use crate::config::quota as config;
pub mod egress;
/// Quota `match` patterns: their syntax is the config's, so the matcher lives there.
pub use crate::config::glob;
pub mod ingress;
pub mod reload;
pub mod reply;
pub mod usage;

pub use ingress::{Admission, Charged, Quotas, Release};
