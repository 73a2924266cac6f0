//! Ingress quotas: limits on what the relay accepts, per sender, AUTH user, client
//! network or shared, in rolling windows ("never more than N in any window").
//!
//! - [`model`]: which quotas a message falls under, with what key and cost, and the
//!   refusals (pure).
//! - [`window`]: the bucketed sliding window, the model both stores follow.
//! - [`store`]: the counter store trait; [`redis`] (one Lua round trip per check,
//!   shared by every relay; scripts in `lua/`) and [`memory`] (in-process)
//!   implement it.
//! - [`engine`]: [`Quotas`], what the SMTP session, the connection task and the
//!   admin API ask; [`gate`]: `action: defer`, held mail released at dispatch.

pub mod engine;
pub mod gate;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod redis;
pub mod store;
pub mod window;

pub use engine::{Admission, Charged, Quotas, Release};
