//! Outbound delivery: where mail for a domain goes and how it gets there.
//!
//! [`mx`] turns a recipient domain into an ordered list of hosts and addresses
//! (RFC 5321 §5.1, RFC 7505); [`retry`] schedules retries of deferred mail and
//! [`dsn`] builds the delivery status notifications sent back to senders;
//! [`smtp_client`] sends messages over one connection, and [`scheduler`] runs
//! delivery against the queue (its modules: routes, lease, dispatch, finalize),
//! writing outcomes as messages finish through [`outcomes`]. [`gate`] holds the
//! traits the scheduler asks before sending (ingress `defer` quotas, egress pacing).
//! [`tls_policy`] decides each destination's transport security (MTA-STS).

pub mod dsn;
pub mod gate;
pub mod mx;
pub mod outcomes;
pub mod retry;
pub mod scheduler;
pub mod smtp_client;
pub mod tls_policy;
pub mod tls_report;
