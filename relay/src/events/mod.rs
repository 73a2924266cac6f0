//! Delivery events, bounce classification, suppression and webhooks: what became
//! of every message, told to the tenants who sent it.

pub mod log;
pub mod webhook;
