//! SMTP protocol logic, free of IO: command parsing, replies, the server session
//! state machine, the strict DATA decoder, SASL exchanges, the client state
//! machine used for delivery, and the PROXY protocol header parser.
//!
//! This crate is a leaf: it knows nothing of the relay's queue, quotas or config.
//! What the session needs from them is defined here ([`envelope`], [`policy`],
//! [`sender::SenderBinding`]) and the relay implements or fills it in.

pub mod auth;
pub mod client;
pub mod command;
pub mod data;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod proxy;
pub mod reply;
pub mod sender;
pub mod session;

pub use reply::Reply;
pub use session::{Peer, Session, SessionConfig, Step, StoreFailure};
