//! What became of mail: bounce classification, suppression lists, delivery
//! events and webhooks, told to the tenants who sent it. Depends on the queue
//! and config only; delivery and the server call into it.

pub mod classify;
pub mod log;
pub mod suppression;
pub mod suppression_admin;
pub mod webhook;
