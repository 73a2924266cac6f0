//! SMTP protocol logic, free of IO: command parsing, replies, the server session
//! state machine, the strict DATA decoder, SASL exchanges and the client state
//! machine used for delivery.

pub mod auth;
pub mod client;
pub mod command;
pub mod data;
pub mod policy;
pub mod reply;
pub mod sender;
pub mod session;

pub use reply::Reply;
pub use session::{Peer, Session, SessionConfig, Step, StoreFailure};
