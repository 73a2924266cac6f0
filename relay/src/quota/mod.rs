//! Send quotas: tenant limits on accepted mail (ingress) and pacing of outbound
//! mail (egress), counted in the queue store so every relay process shares them.
//!
//! [`config`] is the `quotas:` section of the relay config (what the operator's
//! `SendQuota` resources render into); [`egress`] paces outbound delivery.

pub mod config;
pub mod egress;
