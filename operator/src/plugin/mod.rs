//! `kubectl-mailrelay`: a kubectl plugin (krew-style binary on `PATH`) that shows a
//! `MailRelay`'s state and works its queue.
//!
//! `MailRelay` objects are read as [`kube::api::DynamicObject`]s, so the plugin
//! depends on the CRD's group/version/kind only, not on the operator's Rust types.
//! The relay's admin API is reached through the API server's service proxy
//! (`/api/v1/namespaces/{ns}/services/{NAME}-admin:admin/proxy/...`), so no
//! port-forward is needed: the user needs `get` on `mailrelays` and on
//! `services/proxy` (plus `create` for `retry`, which POSTs, and `delete` for
//! `delete`), and `get` on the relay's `NAME-admin-token` Secret: the plugin
//! reads the admin token from it with the user's own credentials and sends it in
//! `X-Mailrelay-Admin-Token` (the API server keeps `Authorization` for itself), so
//! Kubernetes RBAC on that Secret decides who may use a relay's admin API.
//! `retry` and `delete` also name the user in `X-Mailrelay-Actor` for the relay's
//! audit line, as a SelfSubjectReview tells it (best effort: a cluster that
//! refuses the review gets no name, and the command runs all the same).
//! `list` needs neither Secret nor proxy: without them it shows the queue
//! figures the operator last reported.
//!
//! One module per verb; each turns API answers into a view and renders it, so the
//! rendering is testable without a cluster.

pub mod cluster;
pub mod delete;
pub mod events;
pub mod list;
pub mod message;
pub mod output;
pub mod queue;
pub mod quota;
pub mod retry;
pub mod shaping;
pub mod status;
pub mod suppression;
pub mod timeout;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

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
    /// Every namespace (list, status, queue and quota without a relay name).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
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
    /// How long to wait for each request to the API server before giving up, like
    /// kubectl's: 30s, 2m, 1m30s, 500ms; a bare number is seconds; 0 (the default)
    /// waits as long as the connection lives.
    #[arg(long, global = true, value_name = "DURATION", value_parser = timeout::parse)]
    pub request_timeout: Option<Duration>,
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
    /// Every MailRelay with its readiness and live queue summary (`-A`: all namespaces).
    List,
    /// Conditions, replicas, queue summary and quota usage of a MailRelay (every
    /// MailRelay in the namespace, or with `-A` in all, when NAME is left out).
    Status {
        /// Name of the MailRelay.
        name: Option<String>,
    },
    /// List queued messages, like `postqueue -p` (of every MailRelay in the
    /// namespace, or with `-A` in all, when NAME is left out).
    Queue {
        /// Name of the MailRelay.
        name: Option<String>,
        /// Only messages that have had at least one delivery attempt.
        #[arg(long)]
        deferred: bool,
        /// Only messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// At most this many messages per relay (1-10000; the relay's default is 1000).
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
    /// Remove a message from the queue for good: no delivery, no bounce (like
    /// `postsuper -d`). Like `kubectl delete`, it does not ask first.
    Delete {
        /// Name of the MailRelay.
        name: String,
        /// Queue ID (as shown by `queue`).
        id: String,
    },
    /// Quota usage (used and remaining per window) as the relays count it.
    Quota {
        /// Name of a SendQuota; all quotas when left out.
        name: Option<String>,
        /// Only this MailRelay (default: every MailRelay in the namespace).
        #[arg(long)]
        relay: Option<String>,
    },
    /// Suspensions and throttles response rules started (`list`, the default),
    /// on every MailRelay in the namespace; `lift ID` ends one by hand.
    Shaping {
        /// Only this MailRelay (default: every MailRelay in the namespace); also
        /// after `list` / `lift ID`, as the usage shows it.
        #[arg(long, global = true)]
        relay: Option<String>,
        #[command(subcommand)]
        action: Option<shaping::Action>,
    },
    /// A relay's suppression lists: `list`, `add ADDRESS`, `remove ADDRESS`.
    Suppression {
        /// Name of the MailRelay.
        name: String,
        #[command(subcommand)]
        action: suppression::Action,
    },
    /// Delivery events ("where is my mail?"), of one MailRelay or of every
    /// MailRelay in the namespace, oldest first.
    Events {
        /// Name of the MailRelay (default: every MailRelay in the namespace).
        name: Option<String>,
        /// Only this queue ID.
        #[arg(long)]
        queue_id: Option<String>,
        /// Only this Message-ID (with or without angle brackets).
        #[arg(long)]
        message_id: Option<String>,
        /// Only this envelope sender.
        #[arg(long)]
        from: Option<String>,
        /// Only this recipient.
        #[arg(long)]
        to: Option<String>,
        /// From this time: a duration back (30s, 15m, 1h, 2d), a UTC time
        /// (2026-12-07T10:00:00Z) or ms since the epoch.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Only this kind: accepted, delivered, deferred, bounced, expired,
        /// suppressed, dsn_sent.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many, the newest (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Print a shell completion script for `kubectl-mailrelay`
    /// (e.g. `source <(kubectl mailrelay completion bash)`).
    Completion {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
}

/// Everything that can go wrong, each with a message meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{0}")]
    Usage(String),
    #[error("MailRelay \"{name}\" not found in namespace \"{namespace}\"")]
    MailRelayNotFound { namespace: String, name: String },
    #[error(
        "the MailRelay CRD is not installed (mailrelays.{GROUP}/{VERSION} is not served by {server}): install the chart, or `kubectl apply --server-side -f crds/`"
    )]
    CrdMissing { server: String },
    #[error("no MailRelay in {0}")]
    NoMailRelays(String),
    #[error("MailRelay {namespace}/{name} is not ready: {detail}")]
    NotReady {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error(
        "message {id} not found in the queue of MailRelay {namespace}/{name} (already delivered, bounced or deleted?)"
    )]
    MessageNotFound {
        namespace: String,
        name: String,
        id: String,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "cannot connect to the Kubernetes API server at {server}: connection refused (is the cluster running, and is the kubeconfig's server address right?)"
    )]
    ConnectionRefused { server: String },
    #[error(
        "cannot resolve the Kubernetes API server's host name \"{host}\" ({server}): {detail} (check the server address in the kubeconfig, and DNS or VPN)"
    )]
    Dns {
        server: String,
        host: String,
        detail: String,
    },
    #[error(
        "TLS with the Kubernetes API server at {server} failed: {detail} (check the kubeconfig's certificate-authority, and that the server speaks HTTPS)"
    )]
    Tls { server: String, detail: String },
    #[error(
        "no answer from the Kubernetes API server at {server} within {after} ({what}; raise --request-timeout to wait longer)"
    )]
    Timeout {
        server: String,
        after: String,
        what: String,
    },
    #[error("connecting to the Kubernetes API server at {server} timed out")]
    ConnectTimeout { server: String },
    #[error("cannot reach the Kubernetes API server at {server}: {detail}")]
    Transport { server: String, detail: String },
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

/// The completion script for `shell`, for the binary `kubectl-mailrelay` (shells
/// complete a command word; `kubectl mailrelay` is two).
pub fn completion(shell: clap_complete::Shell) -> String {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "kubectl-mailrelay", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Runs one command and returns what to print on stdout.
pub async fn run(cli: &Cli) -> Result<String, PluginError> {
    if let Command::Completion { shell } = cli.command {
        return Ok(completion(shell));
    }
    check_all_namespaces(&cli.global, &cli.command)?;
    let cluster = Cluster::connect(&cli.global).await?;
    execute(&cluster, &cli.command, cli.global.output).await
}

/// `-A` with a relay name is refused as kubectl refuses `get -A NAME`: the name
/// would be looked up in no particular namespace.
fn check_all_namespaces(g: &GlobalArgs, command: &Command) -> Result<(), PluginError> {
    if !g.all_namespaces {
        return Ok(());
    }
    let named = match command {
        Command::List | Command::Completion { .. } => None,
        Command::Status { name } | Command::Queue { name, .. } | Command::Events { name, .. } => {
            name.as_deref()
        }
        Command::Quota { relay, .. } | Command::Shaping { relay, .. } => relay.as_deref(),
        Command::Message { name, .. }
        | Command::Retry { name, .. }
        | Command::Delete { name, .. }
        | Command::Suppression { name, .. } => Some(name.as_str()),
    };
    match named {
        Some(n) => Err(PluginError::Usage(format!(
            "-A/--all-namespaces lists relays across namespaces; it cannot be used with the MailRelay name \"{n}\" (use -n NAMESPACE)"
        ))),
        None => Ok(()),
    }
}

/// Runs one command against an already connected cluster.
pub async fn execute(
    cluster: &Cluster,
    command: &Command,
    format: Option<OutputFormat>,
) -> Result<String, PluginError> {
    match command {
        Command::List => list::run(cluster, format).await,
        Command::Status { name } => status::run(cluster, name.as_deref(), format).await,
        Command::Queue {
            name,
            deferred,
            domain,
            limit,
        } => {
            let filter = queue::Filter {
                deferred: *deferred,
                domain: domain.clone(),
                limit: *limit,
            };
            queue::run(cluster, name.as_deref(), &filter, format).await
        }
        Command::Message { name, id } => message::run(cluster, name, id, format).await,
        Command::Retry {
            name,
            id,
            all,
            domain,
        } => {
            let sel = retry::selector(id.as_deref(), *all, domain.as_deref());
            retry::run(cluster, name, sel, format).await
        }
        Command::Delete { name, id } => delete::run(cluster, name, id, format).await,
        Command::Quota { name, relay } => {
            quota::run(cluster, name.as_deref(), relay.as_deref(), format).await
        }
        Command::Shaping { relay, action } => {
            shaping::run(cluster, relay.as_deref(), action.as_ref(), format).await
        }
        Command::Suppression { name, action } => {
            suppression::run(cluster, name, action, format).await
        }
        Command::Events {
            name,
            queue_id,
            message_id,
            from,
            to,
            since,
            until,
            kind,
            limit,
        } => {
            let filter = events::Filter {
                queue_id: queue_id.clone(),
                message_id: message_id.clone(),
                from: from.clone(),
                to: to.clone(),
                since: since.clone(),
                until: until.clone(),
                kind: kind.clone(),
                limit: *limit,
            };
            events::run(cluster, name.as_deref(), &filter, format).await
        }
        Command::Completion { shell } => Ok(completion(*shell)),
    }
}

/// The binary's `main`: parses arguments, runs, prints; exit code 1 on a failed
/// request, 2 on bad usage.
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
            // Usage errors exit like clap's own (2), so scripts can tell them from a
            // failed request.
            let code = if matches!(e, PluginError::Usage(_)) {
                2
            } else {
                1
            };
            std::process::ExitCode::from(code)
        }
    }
}
