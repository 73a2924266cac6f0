//! The operator's integration tests, one test binary
//! (`cargo test -p mailrelay-operator --test it`).
//!
//! One binary instead of one per file: the fixtures in `support` compile once, and
//! the link step runs once. Every test of every module shares this process, so a
//! test must not change process-wide state (environment variables, the current
//! directory); the one global tracing subscriber (`kubectl_plugin::relay_log`) is
//! installed once and read by that module only. Run one module's tests with
//! `cargo test -p mailrelay-operator --test it builders::`.

mod support;

mod builders;
mod crd_cel_versions;
mod crd_schema;
mod docs;
mod e2e;
mod helm_chart;
mod images;
mod kubectl_plugin;
mod leader;
mod monitoring;
mod network;
mod quickstart;
mod rbac;
mod reconcile;
mod scope;
mod senderdomain;
mod shaping;
mod status;
mod telemetry;
