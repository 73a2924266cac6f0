//! `kubectl-mailrelay`: a kubectl plugin (krew-style binary on `PATH`) that shows a
//! `MailRelay`'s state and works its queue.
//!
//! `MailRelay` objects are read as [`kube::api::DynamicObject`]s, so the plugin
//! depends on the CRD's group/version/kind only, not on the operator's Rust types.
//! The relay's admin API is reached through the API server's service proxy
//! (`/api/v1/namespaces/{ns}/services/{NAME}-admin:admin/proxy/...`), so no
//! port-forward is needed: the user needs `get` on `mailrelays` and on
//! `services/proxy` (plus `create` for `retry`, which POSTs).
//!
//! One module per verb; each turns API answers into a view and renders it, so the
//! rendering is testable without a cluster.

pub mod cluster;
pub mod message;
pub mod output;
pub mod queue;
pub mod quota;
pub mod retry;
pub mod status;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use self::cluster::Cluster;

/// The CRD the plugin reads (see crds/).
pub const GROUP: &str = "mailrelay.io";
pub const VERSION: &str = "v1alpha1";
pub const MAILRELAY_KIND: &str = "MailRelay";
pub const MAILRELAY_PLURAL: &str = "mailrelays";

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-mailrelay",
    bin_name = "kubectl mailrelay",
    version,
    about = "Inspect mailrelay relays and their queues through the Kubernetes API"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags shared by every verb, spelled as kubectl spells them.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Namespace of the MailRelay (default: the context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig cluster to use.
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// The kubeconfig user to use.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config,
    /// then the in-cluster service account).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format: json or yaml (default: human-readable text).
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Conditions, replicas, queue summary and quota usage of a MailRelay.
    Status {
        /// Name of the MailRelay.
        name: String,
    },
    /// List queued messages, like `postqueue -p`.
    Queue {
        /// Name of the MailRelay.
        name: String,
        /// Only messages that have had at least one delivery attempt.
        #[arg(long)]
        deferred: bool,
        /// Only messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// At most this many messages (1-10000; the relay's default is 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One message: envelope, recipients and every delivery attempt with the remote reply.
    Message {
        /// Name of the MailRelay.
        name: String,
        /// Queue ID (as shown by `queue`).
        id: String,
    },
    /// Make messages due for delivery now.
    Retry {
        /// Name of the MailRelay.
        name: String,
        /// One message.
        #[arg(required_unless_present_any = ["all", "domain"], conflicts_with_all = ["all", "domain"])]
        id: Option<String>,
        /// Every queued message.
        #[arg(long, conflicts_with = "domain")]
        all: bool,
        /// Messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Quota usage (used and remaining per window) as the relays count it.
    Quota {
        /// Name of a SendQuota; all quotas when left out.
        name: Option<String>,
        /// Only this MailRelay (default: every MailRelay in the namespace).
        #[arg(long)]
        relay: Option<String>,
    },
}

/// Everything that can go wrong, each with a message meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("MailRelay \"{name}\" not found in namespace \"{namespace}\"")]
    MailRelayNotFound { namespace: String, name: String },
    #[error("no MailRelay in namespace \"{0}\"")]
    NoMailRelays(String),
    #[error("MailRelay {namespace}/{name} is not ready: {detail}")]
    NotReady {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("mailrelay {namespace}/{name}: {message} (HTTP {code})")]
    Relay {
        namespace: String,
        name: String,
        code: u16,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("unexpected answer from {what}: {detail}")]
    Malformed { what: String, detail: String },
}

/// Runs one command and returns what to print on stdout.
pub async fn run(cli: &Cli) -> Result<String, PluginError> {
    let cluster = Cluster::connect(&cli.global).await?;
    execute(&cluster, &cli.command, cli.global.output).await
}

/// Runs one command against an already connected cluster.
pub async fn execute(
    cluster: &Cluster,
    command: &Command,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    match command {
        Command::Status { name } => status::run(cluster, name, format).await,
        Command::Queue {
            name,
            deferred,
            domain,
            limit,
        } => queue::run(cluster, name, *deferred, domain.as_deref(), *limit, format).await,
        Command::Message { name, id } => message::run(cluster, name, id, format).await,
        Command::Retry {
            name,
            id,
            all,
            domain,
        } => {
            let sel = retry::Selector::from_args(id.as_deref(), *all, domain.as_deref());
            retry::run(cluster, name, sel, format).await
        }
        Command::Quota { name, relay } => {
            quota::run(cluster, name.as_deref(), relay.as_deref(), format).await
        }
    }
}

/// The binary's `main`: parses arguments, runs, prints; exit code 1 on any error.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
