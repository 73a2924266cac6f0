//! What became of mail: bounce classification, suppression lists, delivery
//! events and webhooks. Depends on the queue and config only; delivery and the
//! server call into it.

pub mod classify;
pub mod suppression;
pub mod suppression_admin;
