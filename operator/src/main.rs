//! `mailrelay-operator`: runs the controllers (`run`), writes the CRDs (`crdgen`) and
//! renders relay configs (`render-config`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mailrelay_operator::claims::ClaimSettings;
use mailrelay_operator::crd::ServiceType;
use mailrelay_operator::leader::{ElectorConfig, LeaderElector};
use mailrelay_operator::reconcile::{self, Context, DEFAULT_RELAY_IMAGE, Settings};
use mailrelay_operator::resources::network::{self, NetworkSettings};
use mailrelay_operator::telemetry::{self, Metrics};

#[derive(Parser)]
#[command(
    name = "mailrelay-operator",
    version,
    about = "Kubernetes operator for mailrelay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the MailRelay, SendQuota and SenderDomain controllers.
    Run(Box<RunArgs>),
    /// Write the CustomResourceDefinitions as YAML files.
    Crdgen {
        /// Directories to write `mailrelay.io_*.yaml` into (repeat the flag for
        /// several); `-` prints them to stdout. Default: the repository's `crds/`
        /// (plain manifests) and the chart's `files/crds/` (its CRD templates
        /// load them), run from the repository root.
        #[arg(long, default_values = ["crds", "charts/mailrelay-operator/files/crds"])]
        out: Vec<PathBuf>,
    },
    /// Print the normalised relay config (every default spelled out) for a YAML file.
    RenderConfig { file: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Relay image for MailRelays that name none.
    #[arg(long, env = "MAILRELAY_RELAY_IMAGE", default_value = DEFAULT_RELAY_IMAGE)]
    relay_image: String,
    /// Address of `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "MAILRELAY_OPERATOR_METRICS_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    metrics_address: SocketAddr,
    /// How often status is refreshed from the queue store and the relays' admin APIs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    status_interval: Duration,
    /// Base URL of a relay's admin API (`{name}`, `{namespace}` are replaced).
    #[arg(long, default_value = "http://{name}-admin.{namespace}.svc:9325")]
    admin_url_template: String,
    /// Run without leader election (only ever one replica!).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease. `NAMESPACE/NAME` of it also identifies this
    /// install in namespace claims (so two installs need different ones).
    #[arg(long, default_value = "mailrelay-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// SMTP Service types MailRelays may ask for (comma-separated: ClusterIP,
    /// NodePort, LoadBalancer); a MailRelay asking for another is held with
    /// `Ready=False`, reason `ServiceTypeNotAllowed`.
    #[arg(
        long,
        env = "MAILRELAY_ALLOWED_SERVICE_TYPES",
        value_delimiter = ',',
        default_value = "ClusterIP",
        value_parser = network::parse_service_type
    )]
    allowed_service_types: Vec<ServiceType>,
    /// Labels of the operator's own pods (`k=v,k2=v2`): relays' NetworkPolicies
    /// admit them (in the operator's namespace, `POD_NAMESPACE`) to the admin port.
    #[arg(
        long,
        env = "MAILRELAY_OPERATOR_POD_LABELS",
        default_value = "app.kubernetes.io/name=mailrelay-operator",
        value_parser = network::parse_labels
    )]
    operator_pod_labels: std::collections::BTreeMap<String, String>,
    /// Networks the API server connects from (comma-separated CIDRs): relays'
    /// NetworkPolicies admit them to the admin port, for `kubectl mailrelay`
    /// (which goes through the API server's service proxy).
    #[arg(long, env = "MAILRELAY_API_SERVER_CIDRS", value_delimiter = ',')]
    api_server_cidrs: Vec<ipnet::IpNet>,
    /// Labels of the monitoring namespace (`k=v,...`): relays' NetworkPolicies
    /// admit its pods to the admin port (metrics). Empty: none.
    #[arg(
        long,
        env = "MAILRELAY_MONITORING_NAMESPACE_LABELS",
        default_value = "",
        value_parser = network::parse_labels
    )]
    monitoring_namespace_labels: std::collections::BTreeMap<String, String>,
    /// Namespaces to watch and reconcile in (comma-separated); none: every
    /// namespace. Each is claimed for this install (a `mailrelay-operator-claim`
    /// Lease there): one another install claims is left alone.
    #[arg(long, env = "MAILRELAY_WATCH_NAMESPACES", value_delimiter = ',', value_parser = parse_namespace)]
    watch_namespaces: Vec<String>,
    /// Nameservers (`ip:port`, comma-separated) for the DNS checks of
    /// SenderDomains; none: the pod's /etc/resolv.conf (the cluster DNS).
    #[arg(long, env = "MAILRELAY_OPERATOR_DNS_SERVERS", value_delimiter = ',')]
    dns_servers: Vec<SocketAddr>,
}

fn parse_namespace(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mailrelay::config::parse_duration(s)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::RenderConfig { file } => {
            let cfg = mailrelay::config::RelayConfig::from_file(&file)?;
            print!("{}", mailrelay_operator::render_relay_config(&cfg)?);
        }
        Command::Crdgen { out } => {
            for dir in &out {
                for (file, crd) in mailrelay_operator::crd::all_crds() {
                    let yaml = mailrelay_operator::crd::crd_yaml(&crd);
                    if dir.as_os_str() == "-" {
                        print!("---\n{yaml}");
                    } else {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("cannot create {}", dir.display()))?;
                        let path = dir.join(file);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        eprintln!("wrote {}", path.display());
                    }
                }
            }
        }
        Command::Run(args) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(*args))?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let client = kube::Client::try_default()
        .await
        .context("cannot configure the Kubernetes client")?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_address))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let server = tokio::spawn(telemetry::serve(listener, metrics.clone(), wait_stop()));
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let settings = Settings {
        relay_image: args.relay_image,
        status_interval: args.status_interval,
        admin_url_template: args.admin_url_template,
        network: NetworkSettings {
            operator_namespace: args.lease_namespace.clone(),
            operator_pod_labels: args.operator_pod_labels,
            api_server_cidrs: args
                .api_server_cidrs
                .iter()
                .map(|c| c.trunc().to_string())
                .collect(),
            // An empty selector would select every namespace.
            monitoring_namespace_labels: (!args.monitoring_namespace_labels.is_empty())
                .then_some(args.monitoring_namespace_labels),
        },
        allowed_service_types: args.allowed_service_types,
        watch_namespaces: args.watch_namespaces,
        dns_servers: args.dns_servers,
        // One identity per install, shared by its replicas: its leader Lease.
        claims: Some(ClaimSettings::new(&format!(
            "{}/{}",
            args.lease_namespace, args.lease_name
        ))),
        ..Settings::default()
    };
    if settings.watch_namespaces.is_empty() {
        tracing::info!("watching every namespace");
    } else {
        tracing::info!(namespaces = ?settings.watch_namespaces, "watching only these namespaces");
    }
    let ctx = Context::new(client.clone(), settings, metrics.clone());
    if args.no_leader_election {
        metrics.set_leader(true);
        reconcile::run(ctx, wait_stop()).await;
    } else {
        let identity = args
            .identity
            .or_else(|| std::env::var("HOSTNAME").ok())
            .context("no identity for leader election: set POD_NAME or --identity")?;
        let mut cfg = ElectorConfig::new(&args.lease_namespace, &identity);
        cfg.name = args.lease_name;
        let elector = LeaderElector::new(client, cfg);
        tokio::select! {
            _ = elector.acquire() => {}
            _ = wait_stop() => return Ok(()),
        }
        metrics.set_leader(true);
        tokio::select! {
            _ = reconcile::run(ctx, wait_stop()) => elector.release().await,
            _ = elector.hold() => {
                metrics.set_leader(false);
                // Another replica may be reconciling already: stop at once and let
                // the pod restart as a follower.
                anyhow::bail!("lost the leader Lease");
            }
        }
    }
    let _ = server.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_namespaces_are_a_comma_separated_list_of_namespace_names() {
        let cli =
            Cli::try_parse_from(["op", "run", "--watch-namespaces", "team-a,team-b"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run");
        };
        assert_eq!(args.watch_namespaces, ["team-a", "team-b"]);
        let Command::Run(args) = Cli::try_parse_from(["op", "run"]).unwrap().command else {
            panic!("run");
        };
        assert!(args.watch_namespaces.is_empty(), "default: every namespace");
        let e = Cli::try_parse_from(["op", "run", "--watch-namespaces", "team-a,Team_B"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"Team_B\" is not a namespace name"), "{e}");
    }
}
