//! mailrelay: an SMTP store-and-forward relay with a Redis or embedded durable queue.
//!
//! Protocol logic lives in the `mailrelay_smtp` crate as IO-free state machines;
//! [`server`] drives them over sockets; [`queue`] stores accepted mail; [`metrics`]
//! is the registry they record into; [`admin`] serves health, metrics and the queue API.

pub mod admin;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod queue;
pub mod quota;
pub mod redis_conn;
pub mod server;
