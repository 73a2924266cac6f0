//! The relay's admin API, written once: the JSON types ([`types`]), the endpoint
//! paths and their encoding ([`path`]), and one [`Client`] over a [`Transport`]:
//! direct HTTP ([`http::HttpTransport`]) for the relay CLI and the operator; the
//! kubectl plugin's API-server service proxy transport lives in the operator
//! crate, so that kube stays out of the relay binary.
//!
//! The relay's axum handlers serialize these types and route by
//! [`path::routes`], so a renamed field or path breaks the compile of both sides,
//! not a user's command. This crate depends on nothing of the relay.

pub mod client;
pub mod events;
pub mod http;
pub mod path;
pub mod types;

pub use client::{ACTOR_HEADER, Client, Error, Request, Response, TOKEN_HEADER, Transport};
pub use events::{Event, EventKind, EventList, EventQuery};
pub use path::{Call, Method};
pub use types::*;
