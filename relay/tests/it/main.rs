//! The relay's integration tests, one test binary (`cargo test -p mailrelay --test it`).
//!
//! One binary instead of one per file: the fixtures in `support` compile once, and
//! the link step runs once. Every test of every module shares this process, so a
//! test must not change process-wide state (environment variables, the current
//! directory, a global tracing subscriber); the few that need a resource alone
//! (fixed ports, Postfix) take a lock for it. Run one module's tests with
//! `cargo test -p mailrelay --test it delivery::`.

mod support;

mod auth_throttle;
mod bounces;
mod connection_fairness;
mod dane;
mod delivery;
mod delivery_crash;
mod delivery_dsn;
mod delivery_relayhosts;
mod dkim_signing;
mod events;
mod finish_events;
mod harness_smoke;
mod hostile_input;
mod lease_failover;
mod lease_renewal;
mod lua_lint;
mod mta_sts;
mod mx_resolution;
mod operations;
mod postfix_chain;
mod postfix_relay_in;
mod presets;
mod queue_cli;
mod queue_conformance;
mod quota_egress;
mod quota_ingress;
mod quota_store;
mod real_clients;
mod redis_cluster_failover;
mod redis_enqueue_group;
mod redis_fresh;
mod redis_lease;
mod redis_queue_layout;
mod redis_sentinel;
mod requiretls;
mod shaping;
mod smtp_client;
mod tls_rpt;
mod webhooks;
