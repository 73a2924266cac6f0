//! The `mailrelay` command: `serve` runs the relay, `check-config` validates a file.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use mailrelay::admin::{self, AdminState};
use mailrelay::config::{LogFormat, QueueBackendKind, RelayConfig};
use mailrelay::delivery::scheduler::Delivery;
use mailrelay::events::log::{EmbeddedEvents, EventMetrics, EventSink, EventStore, RedisEvents};
use mailrelay::events::webhook::{WebhookMetrics, Webhooks};
use mailrelay::metrics::Metrics;
use mailrelay::queue::{EmbeddedQueue, Inspect, Leasing, Queue, QueueOptions, RedisQueue};
use mailrelay::quota::egress::Egress;
use mailrelay::quota::egress::metrics::EgressMetrics;
use mailrelay::quota::ingress::metrics::QuotaMetrics;
use mailrelay::quota::{self, Quotas};
use mailrelay::server::{self, Shared, tls::TlsSource, users::UsersSource};

#[derive(Parser)]
#[command(
    name = "mailrelay",
    version,
    about = "SMTP store-and-forward relay with a Redis or embedded durable queue"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay. Without a config file: SMTP on 127.0.0.1:2525, admin HTTP on
    /// 127.0.0.1:9325, loopback clients may relay, queue under ./mailrelay-data.
    Serve {
        /// YAML configuration file.
        #[arg(long, short, env = "MAILRELAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (with MAILRELAY_* environment overrides) and exit.
    CheckConfig {
        /// YAML configuration file.
        file: PathBuf,
    },
    /// Inspect and act on the queue of a running relay through its admin API.
    Queue(mailrelay::cli::queue::QueueArgs),
    /// Show send quota usage of a running relay through its admin API.
    Quota(mailrelay::cli::quota::QuotaArgs),
    /// Show and lift response-rule states (suspensions, throttles) of the relays.
    Shaping(mailrelay::cli::shaping::ShapingArgs),
    /// List, add or remove suppressed recipients of a running relay through its admin API.
    Suppression(mailrelay::cli::suppression::SuppressionArgs),
    /// Delivery events of a running relay ("where is my mail?").
    Events(mailrelay::cli::events::EventsArgs),
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<RelayConfig> {
    let mut cfg = match path {
        Some(p) => RelayConfig::from_file(p)?,
        None => RelayConfig::default(),
    };
    cfg.apply_env(|k| std::env::var(k).ok())?;
    Ok(cfg)
}

/// mimalloc instead of the system allocator: see relay/Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. mimalloc asks for them
/// (`MADV_HUGEPAGE`) on its arenas, and each first touch of a huge page then
/// zeroes 2 MiB: with 100 KB messages the kernel's page zeroing was most of the
/// relay's CPU in a drain (bench/README.md, "Transparent huge pages"), for a gain
/// in TLB misses the relay's working set does not need. The kernel checks the flag
/// at every fault, so it also covers what was mapped before `main`.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only sets a
    // flag of the calling process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { file } => match load_config(Some(&file)).and_then(|cfg| {
            if let Some(d) = &cfg.dkim {
                let keys = mailrelay::dkim::load_keys(d).context("loading the DKIM keys")?;
                for w in &keys.warnings {
                    eprintln!("warning: {w}");
                }
            }
            Ok(cfg)
        }) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} listener(s), {:?} queue, {} relay network(s), {} quota(s))",
                    file.display(),
                    cfg.listeners.len(),
                    cfg.queue.effective_backend(),
                    cfg.relay_networks.len(),
                    cfg.quotas.len()
                );
                Ok(())
            }
            Err(e) => Err(e),
        },
        Command::Queue(args) => return mailrelay::cli::queue::run(args),
        Command::Quota(args) => return mailrelay::cli::quota::run(args),
        Command::Shaping(args) => return mailrelay::cli::shaping::run(args),
        Command::Suppression(args) => return mailrelay::cli::suppression::run(args),
        Command::Events(args) => return mailrelay::cli::events::run(args),
        Command::Serve { config } => load_config(config.as_ref()).and_then(|cfg| {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = cfg.runtime.worker_threads {
                rt.worker_threads(n);
            }
            rt.enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(serve(cfg, config))
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailrelay: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_logging(cfg: &RelayConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in a pod's log or a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The queue, and the Redis queue itself when it is one (the quota counters share
/// its connection).
async fn open_queue(
    cfg: &RelayConfig,
) -> anyhow::Result<(
    Arc<dyn Queue>,
    Option<Arc<RedisQueue>>,
    Option<Arc<redb::Database>>,
)> {
    Ok(match cfg.queue.effective_backend() {
        QueueBackendKind::Embedded => {
            let path = cfg.queue.path.clone();
            let options = queue_options(cfg);
            let q = tokio::task::spawn_blocking(move || EmbeddedQueue::open_with(&path, options))
                .await?
                .with_context(|| {
                    format!("opening the embedded queue in {}", cfg.queue.path.display())
                })?;
            let db = q.database();
            (Arc::new(q), None, Some(db))
        }
        QueueBackendKind::Redis => {
            let rcfg = cfg
                .queue
                .redis
                .as_ref()
                .context("queue.redis is not configured")?;
            let q = Arc::new(
                RedisQueue::connect_with(rcfg, queue_options(cfg))
                    .await
                    .context("connecting to Redis")?,
            );
            (Arc::clone(&q) as Arc<dyn Queue>, Some(q), None)
        }
    })
}

/// Quota counters live where the queue does: in Redis beside it, or in this process.
async fn open_quotas(
    cfg: &RelayConfig,
    redis: Option<Arc<RedisQueue>>,
    metrics: QuotaMetrics,
) -> anyhow::Result<Arc<Quotas>> {
    let store: Arc<dyn quota::ingress::store::CounterStore> = match redis {
        Some(q) => Arc::new(
            quota::ingress::redis::RedisStore::with_queue(q)
                .await
                .context("loading the quota scripts into Redis")?,
        ),
        None => Arc::new(quota::ingress::memory::MemoryStore::new()),
    };
    Ok(Quotas::new(
        &cfg.effective_quotas(),
        store,
        metrics,
        cfg.queue.write_timeout,
    ))
}

/// Suppression lists live where the queue does (when `suppression:` is configured).
async fn open_suppression(
    cfg: &RelayConfig,
    redis: Option<&Arc<RedisQueue>>,
    embedded_db: Option<Arc<redb::Database>>,
) -> anyhow::Result<Option<Arc<mailrelay::events::suppression::Suppression>>> {
    use mailrelay::events::suppression::{
        EmbeddedSuppression, MemorySuppression, RedisSuppression, Suppression, SuppressionStore,
    };
    let Some(scfg) = &cfg.suppression else {
        return Ok(None);
    };
    let store: Box<dyn SuppressionStore> = match redis {
        Some(q) => Box::new(
            RedisSuppression::new(q.shared())
                .await
                .context("loading the suppression scripts into Redis")?,
        ),
        None => match embedded_db {
            Some(db) => Box::new(
                EmbeddedSuppression::open(db)
                    .context("opening the suppression lists in the embedded queue")?,
            ),
            None => Box::new(MemorySuppression::new()),
        },
    };
    info!(
        backend = store.backend(),
        scope = ?scfg.scope,
        auto_add = scfg.auto_add,
        "suppression lists ready"
    );
    Ok(Some(Arc::new(Suppression::new(store, scfg.clone()))))
}

fn queue_options(cfg: &RelayConfig) -> QueueOptions {
    QueueOptions {
        status_retention: cfg.queue.status_retention,
        cache_size: cfg.queue.cache_size,
    }
}

/// SIGTERM and SIGINT, each one stream for the whole shutdown, so that a second
/// signal arriving while the first is handled is not lost. Installed once the relay
/// is about to serve: before that a signal still just ends the process.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// The next SIGTERM or SIGINT; returns its name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The first phase of a shutdown: `/readyz` fails at once (`draining`), while the
/// listeners go on accepting and serving for `settle`, so that clients still routed
/// here while endpoints and load balancers catch up are served rather than refused.
/// A second signal ends it early.
async fn settle(signals: &mut StopSignals, draining: &AtomicBool, settle: Duration) {
    let first = signals.next().await;
    draining.store(true, Ordering::SeqCst);
    if settle.is_zero() {
        info!(
            signal = first,
            "shutdown: readiness now fails; no settle period"
        );
        return;
    }
    info!(
        signal = first,
        settle = ?settle,
        "shutdown: readiness now fails; still accepting connections for shutdown_settle"
    );
    tokio::select! {
        _ = tokio::time::sleep(settle) => info!("shutdown: settle period over"),
        again = signals.next() => info!(signal = again, "shutdown: second signal, settle period cut short"),
    }
}

async fn serve(cfg: RelayConfig, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    init_logging(&cfg);
    let (queue, redis, embedded_db) = open_queue(&cfg).await?;
    info!(backend = queue.backend(), hostname = %cfg.hostname, "queue open");
    info!(
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "runtime ready"
    );
    let mut metrics = Metrics::new();
    // Quota checks and egress pacing keep their own families, in the same exposition.
    let quota_metrics = QuotaMetrics::register(metrics.registry_mut());
    let egress_metrics = EgressMetrics::default();
    egress_metrics.register(metrics.registry_mut());
    let dkim_metrics = mailrelay::dkim::metrics::DkimMetrics::register(metrics.registry_mut());
    let event_metrics = EventMetrics::register(metrics.registry_mut());
    let webhook_metrics = WebhookMetrics::register(metrics.registry_mut());
    let tls_metrics =
        mailrelay::delivery::tls_policy::metrics::TlsMetrics::register(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let event_store = match (cfg.events.enabled, &redis, embedded_db.clone()) {
        (false, _, _) => None,
        (true, Some(q), _) => Some(EventStore::Redis(RedisEvents::new(
            q.shared(),
            cfg.events.max_len,
        ))),
        (true, None, Some(db)) => Some(EventStore::Embedded(
            EmbeddedEvents::open(db, cfg.events.max_len)
                .context("opening the event store in the embedded queue")?,
        )),
        (true, None, None) => None,
    };
    let events = event_store
        .clone()
        .map(|s| EventSink::start(s, &cfg.events, event_metrics));
    let _webhooks = match &event_store {
        Some(store) if !cfg.webhooks.is_empty() => Some(
            Webhooks::start(
                &cfg.webhooks,
                store.clone(),
                &format!("mailrelay://{}", cfg.hostname),
                &format!("{}:{}", cfg.hostname, std::process::id()),
                webhook_metrics,
            )
            .await
            .context("starting the webhook consumers")?,
        ),
        _ => None,
    };
    let auth_failures: Option<Arc<dyn server::auth_throttle::FailureStore>> =
        match (&cfg.auth, &redis) {
            (None, _) => None,
            (Some(_), Some(q)) => Some(Arc::new(
                server::auth_throttle::RedisFailures::new(q.shared())
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("loading the AUTH throttle scripts into Redis")?,
            )),
            (Some(_), None) => Some(Arc::new(server::auth_throttle::MemoryFailures::default())),
        };
    let suppression = open_suppression(&cfg, redis.as_ref(), embedded_db.clone()).await?;
    // MTA-STS policies are shared through the queue's Redis, so one fetch serves
    // every relay; the embedded queue keeps them in this process.
    let sts_store = match &redis {
        Some(q) if cfg.delivery.enabled => Some(
            mailrelay::delivery::tls_policy::cache::RedisPolicies::new(q.shared())
                .await
                .map_err(anyhow::Error::msg)
                .context("loading the MTA-STS cache scripts into Redis")?,
        ),
        _ => None,
    };
    // TLS report counters: in the queue's Redis (shared by every relay), else in
    // the embedded queue's file (kept across restarts).
    let tls_report_store: Option<Arc<dyn mailrelay::delivery::tls_report::store::ReportStore>> =
        match (&cfg.tls_reporting, &redis) {
            (Some(t), _) if !t.enabled || !cfg.delivery.enabled => None,
            (None, _) => None,
            (Some(_), Some(q)) => Some(Arc::new(
                mailrelay::delivery::tls_report::store::RedisReports::new(q.shared())
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("loading the TLS report scripts into Redis")?,
            )),
            (Some(_), None) => match embedded_db {
                Some(db) => Some(Arc::new(
                    mailrelay::delivery::tls_report::store::EmbeddedReports::open(db)
                        .map_err(anyhow::Error::msg)
                        .context("opening the TLS report tables in the embedded queue")?,
                )),
                None => Some(Arc::new(
                    mailrelay::delivery::tls_report::store::MemoryReports::default(),
                )),
            },
        };
    let quotas = open_quotas(&cfg, redis, quota_metrics).await?;
    info!(
        backend = quotas.backend(),
        quotas = cfg.quotas.len(),
        "send quotas ready"
    );
    quota::reload::spawn(Arc::clone(&quotas), cfg.clone(), config_path);
    let tls = match &cfg.tls {
        Some(t) => {
            let src = TlsSource::load(t).context("loading the TLS certificate")?;
            src.spawn_reloader(t.reload_interval);
            Some(src)
        }
        None => None,
    };
    let users = match &cfg.auth {
        Some(a) => {
            let u = UsersSource::load(a.users_file.clone())?;
            u.spawn_reloader(std::time::Duration::from_secs(10));
            Some(u)
        }
        None => None,
    };
    let draining = Arc::new(AtomicBool::new(false));
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_task = match cfg.admin.address {
        Some(addr) => {
            let admin_auth =
                admin::auth::AdminAuth::from_env(cfg.admin.token_file.clone())?.for_address(addr);
            if !admin_auth.enabled() && !addr.ip().is_loopback() {
                // Started anyway: probes and metrics still serve; only `/api/` refuses.
                warn!(
                    address = %addr,
                    "admin API /api/ is REFUSED (403): no admin token is configured and the admin listener is not on loopback; set admin.token_file or MAILRELAY_ADMIN_TOKEN"
                );
            }
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin HTTP cannot listen on {addr}"))?;
            info!(address = %addr, "admin HTTP ready");
            let state = AdminState {
                queue: Arc::clone(&queue) as Arc<dyn Inspect>,
                metrics: Arc::clone(&metrics),
                draining: Arc::clone(&draining),
                auth: admin_auth,
            };
            Some(tokio::spawn(admin::serve_with(
                listener,
                state,
                {
                    let mut routes = quota::admin::routes(Arc::clone(&quotas));
                    if let Some(s) = &suppression {
                        routes = routes
                            .merge(mailrelay::events::suppression_admin::routes(Arc::clone(s)));
                    }
                    if let Some(store) = &event_store {
                        routes = routes.merge(admin::events::routes(store.clone()));
                    }
                    routes
                },
                async move {
                    let _ = admin_stop_rx.await;
                },
            )))
        }
        None => None,
    };
    let listeners = server::bind(&cfg)?;
    let delivery = if cfg.delivery.enabled {
        let egress = Egress::from_config(&cfg)
            .await
            .context("connecting egress pacing to its store")?
            .with_metrics(egress_metrics);
        let rules = mailrelay::shaping::Rules::from_config(&cfg)
            .map_err(|(f, m)| anyhow::anyhow!("invalid config: field `{f}`: {m}"))?;
        if !rules.is_empty() {
            info!(rules = rules.len(), "response rules in force");
        }
        egress.set_rules(rules);
        // Mail postponed for a rule state comes back when the state is lifted.
        let wake_queue = Arc::clone(&queue);
        egress.set_waker(Arc::new(move |domains: Vec<String>| {
            let q = Arc::clone(&wake_queue);
            Box::pin(async move {
                for d in domains {
                    let sel = mailrelay::queue::RetrySelector::Domain(d.clone());
                    if let Err(e) = q.retry_now(sel).await {
                        tracing::warn!(domain = %d, error = %e, "making postponed mail due again failed");
                    }
                }
            })
        }));
        quotas.set_egress_usage(Arc::new(egress.clone()));
        info!(store = egress.backend(), "egress pacing ready");
        Some(
            Delivery::start_with(
                Arc::clone(&queue),
                cfg.delivery.clone(),
                cfg.hostname.clone(),
                Arc::clone(&metrics),
                Arc::new(server::quota::EgressPacing(egress)),
                Some(Arc::new(server::quota::DeferHook(
                    quota::ingress::gate::DeferGate::new(
                        Arc::clone(&quotas),
                        Arc::clone(&queue) as Arc<dyn Leasing>,
                        cfg.delivery.retry.max_lifetime,
                    ),
                ))),
            )
            .context("starting delivery")?,
        )
    } else {
        info!("delivery disabled: this relay only receives");
        None
    };
    let grace = cfg.shutdown_grace;
    let settle_for = cfg.shutdown_settle;
    let mut signals = StopSignals::listen()?;
    let auth_throttle = match (&cfg.auth, auth_failures) {
        (Some(a), Some(store)) => Some(server::auth_throttle::AuthThrottle::new(
            a.throttle.clone(),
            store,
            Arc::clone(&metrics),
            cfg.queue.write_timeout,
        )),
        _ => None,
    };
    let dkim = match &cfg.dkim {
        Some(d) if mailrelay::dkim::configured(d) => {
            let dkim = mailrelay::dkim::Dkim::load(d, dkim_metrics.clone())
                .context("loading the DKIM keys")?;
            let keys = dkim.keys();
            for (domain, k) in &keys.domains {
                for key in &k.keys {
                    info!(domain = %domain, selector = %key.selector, algorithm = key.algorithm.as_str(), "DKIM key ready; publish at {}._domainkey.{domain}: {}", key.selector, key.dns_record());
                }
            }
            dkim.spawn_reloader();
            Some(dkim)
        }
        _ => None,
    };
    if let (Some(d), Some(delivery)) = (&dkim, &delivery) {
        delivery.sign_dsns_with(Arc::clone(d));
    }
    if let (Some(s), Some(delivery)) = (&suppression, &delivery) {
        delivery.suppress_with(Arc::clone(s));
    }
    if let (Some(store), Some(delivery)) = (sts_store, &delivery) {
        delivery.share_policies_with(Arc::new(store));
    }
    if let Some(delivery) = &delivery {
        delivery.count_tls_with(tls_metrics.clone());
    }
    let tls_reports = match (&cfg.tls_reporting, tls_report_store, &delivery) {
        (Some(t), Some(store), Some(delivery)) => {
            use mailrelay::delivery::tls_report::{TlsReporter, send};
            let reporter = TlsReporter::new(t.period, store);
            delivery.report_tls_with(Arc::clone(&reporter));
            let flusher = reporter.spawn_flusher();
            let ca = t.ca_file.as_deref().or(cfg.delivery.ca_file.as_deref());
            let roots = match ca {
                Some(p) => mailrelay::delivery::smtp_client::load_roots(p)
                    .context("loading tls_reporting.ca_file")?,
                None => mailrelay::delivery::smtp_client::load_roots(std::path::Path::new(
                    mailrelay::delivery::smtp_client::SYSTEM_CA_FILE,
                ))
                .unwrap_or_else(|e| {
                    warn!(error = %e, "no system CA store; https: TLS reports will fail");
                    rustls::RootCertStore::empty()
                }),
            };
            let sender = send::Sender::new(
                t,
                &cfg.hostname,
                roots,
                send::SenderParts {
                    reporter: Arc::clone(&reporter),
                    queue: Arc::clone(&queue),
                    resolver: delivery.dns_resolver(),
                    dkim: dkim.clone(),
                    metrics: tls_metrics.clone(),
                    doorbell: Some(delivery.doorbell()),
                },
            )
            .context("building the TLS report HTTPS client")?;
            info!(
                store = reporter.store().backend(),
                period = ?t.period,
                submitter = %sender.submitter,
                "TLS reporting on (RFC 8460)"
            );
            Some((flusher, sender.spawn(), reporter))
        }
        _ => None,
    };
    if let (Some(sink), Some(delivery)) = (&events, &delivery) {
        delivery.record_events_with(sink.clone());
    }
    let shared = Shared::new(cfg, queue, metrics, tls, users, Some(quotas));
    if let Some(d) = dkim {
        shared.set_dkim(d);
    }
    if let Some(s) = suppression {
        shared.set_suppression(s);
    }
    if let Some(sink) = &events {
        info!(store = sink.store().backend(), "delivery events recorded");
        shared.set_events(sink.clone());
    }
    if let Some(t) = auth_throttle {
        info!(backend = t.backend(), "AUTH throttle ready");
        shared.set_auth_throttle(t);
    }
    if let Some(d) = &delivery {
        shared.ring_on_queue(d.doorbell());
    }
    let flag = Arc::clone(&draining);
    let (delivery_drain_tx, delivery_drain_rx) = tokio::sync::oneshot::channel();
    server::serve(shared, listeners, async move {
        settle(&mut signals, &flag, settle_for).await;
        // Delivery drains alongside the SMTP sessions, under the same grace.
        if let Some(d) = delivery {
            let _ = delivery_drain_tx.send(tokio::spawn(d.shutdown(grace)));
        }
    })
    .await;
    if let Ok(drain) = delivery_drain_rx.await {
        let _ = drain.await;
    }
    if let Some(sink) = &events {
        sink.flush().await;
    }
    // The sessions of the last second, into the shared (or embedded) counters.
    if let Some((_, _, reporter)) = &tls_reports {
        reporter.flush().await;
    }
    let _ = admin_stop_tx.send(());
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    info!("shutdown complete");
    Ok(())
}
