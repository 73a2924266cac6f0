//! The SMTP side of a relay process: listeners, connection admission, PROXY
//! protocol, TLS, and one task per connection driving a [`Session`].

pub mod auth_throttle;
pub mod conn;
pub mod limits;
pub mod proxy;
pub mod quota;
pub mod tls;
pub mod users;
pub mod wake;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{ListenerConfig, RelayConfig, TlsMode};
use crate::metrics::Metrics;
use crate::queue::Ingest;
use conn::{Conn, Stream};
use limits::ConnLimits;
use mailrelay_smtp::{Peer, Session, SessionConfig};
use tls::TlsSource;
use users::UsersSource;

/// Everything connection tasks share.
pub struct Shared {
    pub config: RelayConfig,
    pub session: SessionConfig,
    pub queue: Arc<dyn Ingest>,
    pub metrics: Arc<Metrics>,
    pub tls: Option<Arc<TlsSource>>,
    pub users: Option<Arc<UsersSource>>,
    pub limits: Arc<ConnLimits>,
    /// Send quotas (ingress checks); `None` runs without any.
    pub quotas: Option<Arc<crate::quota::Quotas>>,
    /// Which senders AUTH users and relay networks may use (`sender_binding`).
    pub senders: Option<Arc<mailrelay_smtp::sender::SenderPolicy>>,
    /// Rung after each message queued: this process's delivery (see
    /// [`Shared::ring_on_queue`]).
    doorbell: std::sync::OnceLock<crate::delivery::scheduler::Doorbell>,
    /// Brakes on AUTH password guessing (set when AUTH is configured).
    auth_throttle: std::sync::OnceLock<Arc<auth_throttle::AuthThrottle>>,
    /// Signs accepted mail (set when `dkim:` is configured).
    dkim: std::sync::OnceLock<Arc<crate::dkim::Dkim>>,
    /// Suppression lists checked at `RCPT` (set when `suppression:` is configured).
    suppression: std::sync::OnceLock<Arc<crate::events::suppression::Suppression>>,
    /// Records `accepted` events (set when the event log is on).
    events: std::sync::OnceLock<crate::events::log::EventSink>,
    active: AtomicUsize,
}

impl Shared {
    pub fn new(
        config: RelayConfig,
        queue: Arc<dyn Ingest>,
        metrics: Arc<Metrics>,
        tls: Option<Arc<TlsSource>>,
        users: Option<Arc<UsersSource>>,
        quotas: Option<Arc<crate::quota::Quotas>>,
    ) -> Arc<Self> {
        let l = &config.limits;
        let session = SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: l.max_message_size,
            max_recipients: l.max_recipients,
            max_line_length: l.max_line_length,
            max_errors: l.max_errors,
            max_messages: l.max_messages_per_connection,
            add_missing_headers: config.add_missing_headers,
            queue_store: queue.backend(),
        };
        let limits = ConnLimits::with_fairness(
            l.max_connections,
            l.max_connections_per_ip,
            l.max_connections_per_network,
            l.network_prefix_v4,
            l.network_prefix_v6,
            l.reserved_connections,
            (!l.evict_idle_after.is_zero()).then_some(l.evict_idle_after),
        );
        let senders = config
            .sender_binding
            .as_ref()
            .map(|b| Arc::new(mailrelay_smtp::sender::SenderPolicy::new(&b.binding())));
        Arc::new(Shared {
            senders,
            config,
            session,
            queue,
            metrics,
            tls,
            users,
            limits,
            quotas,
            doorbell: std::sync::OnceLock::new(),
            auth_throttle: std::sync::OnceLock::new(),
            dkim: std::sync::OnceLock::new(),
            suppression: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
            active: AtomicUsize::new(0),
        })
    }

    /// Checks recipients against `s` at `RCPT` (once; later calls are ignored).
    pub fn set_suppression(&self, s: Arc<crate::events::suppression::Suppression>) {
        let _ = self.suppression.set(s);
    }

    pub fn suppression(&self) -> Option<&Arc<crate::events::suppression::Suppression>> {
        self.suppression.get()
    }

    /// Rings `doorbell` after every message queued from now on (once; later calls
    /// are ignored).
    pub fn ring_on_queue(&self, doorbell: crate::delivery::scheduler::Doorbell) {
        let _ = self.doorbell.set(doorbell);
    }

    /// Throttles AUTH failures with `t` (once; later calls are ignored).
    pub fn set_auth_throttle(&self, t: Arc<auth_throttle::AuthThrottle>) {
        let _ = self.auth_throttle.set(t);
    }

    pub fn auth_throttle(&self) -> Option<&Arc<auth_throttle::AuthThrottle>> {
        self.auth_throttle.get()
    }

    /// Signs accepted mail from now on (once; later calls are ignored).
    pub fn set_dkim(&self, d: Arc<crate::dkim::Dkim>) {
        let _ = self.dkim.set(d);
    }

    /// Records an `accepted` event for every message queued from now on (once;
    /// later calls are ignored).
    pub fn set_events(&self, sink: crate::events::log::EventSink) {
        let _ = self.events.set(sink);
    }

    pub fn events(&self) -> Option<&crate::events::log::EventSink> {
        self.events.get()
    }

    pub fn dkim(&self) -> Option<&Arc<crate::dkim::Dkim>> {
        self.dkim.get()
    }

    /// A message was queued.
    fn queued(&self) {
        if let Some(d) = self.doorbell.get() {
            d.ring();
        }
    }

    /// Sessions currently running (including ones still in their handshake).
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn relay_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.relay_networks.iter().any(|n| n.contains(&ip))
    }
}

/// Binds every configured listener (so bind errors surface before we serve).
pub fn bind(config: &RelayConfig) -> std::io::Result<Vec<(ListenerConfig, TcpListener)>> {
    config
        .listeners
        .iter()
        .map(|l| {
            let socket = if l.address.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            // Linux gives accepted sockets the listener's TCP_NODELAY: one setsockopt
            // here instead of one per connection (see `handle`).
            socket.set_nodelay(true)?;
            socket.bind(l.address).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {} ({}): {e}", l.address, l.name),
                )
            })?;
            Ok((l.clone(), socket.listen(4096)?))
        })
        .collect()
}

/// Graceful-shutdown switches handed to every session.
#[derive(Clone)]
struct Signals {
    /// Set when the grace period is over, for waits other than reads.
    closing: watch::Receiver<bool>,
    /// Draining and closing as sessions' reads wait for them (see [`wake`]).
    wakes: Arc<wake::Wakes>,
}

/// Serves on listeners made by [`bind`] (which sets TCP_NODELAY that accepted
/// sockets inherit on Linux) until `shutdown` resolves (after any settle period: until then everything
/// is served as usual), then stops accepting, lets sessions finish for
/// `config.shutdown_grace`, and sends `421` to those still open.
pub async fn serve(
    shared: Arc<Shared>,
    listeners: Vec<(ListenerConfig, TcpListener)>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (close_tx, closing) = watch::channel(false);
    let wakes = wake::Wakes::new();
    let signals = Signals {
        closing,
        wakes: Arc::clone(&wakes),
    };
    let mut accept_tasks = Vec::new();
    for (lcfg, listener) in listeners {
        info!(listener = %lcfg.name, address = %lcfg.address, tls = ?lcfg.tls, proxy_protocol = lcfg.proxy_protocol, "SMTP listener ready");
        accept_tasks.push(tokio::spawn(accept_loop(
            Arc::clone(&shared),
            Arc::new(lcfg),
            listener,
            signals.clone(),
        )));
    }
    shutdown.await;
    info!(sessions = shared.active_sessions(), grace = ?shared.config.shutdown_grace, "shutdown: listeners closed; open sessions may finish within shutdown_grace");
    for t in &accept_tasks {
        t.abort();
    }
    wakes.raise(wake::DRAINING);
    let deadline = Instant::now() + shared.config.shutdown_grace;
    while shared.active_sessions() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.active_sessions();
    if left > 0 {
        warn!(
            sessions = left,
            "grace period over: closing remaining sessions with 421"
        );
        let _ = close_tx.send(true);
        wakes.raise(wake::CLOSING);
        let hard = Instant::now() + Duration::from_secs(5);
        while shared.active_sessions() > 0 && Instant::now() < hard {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    info!("shutdown: SMTP server stopped");
}

async fn accept_loop(
    shared: Arc<Shared>,
    lcfg: Arc<ListenerConfig>,
    listener: TcpListener,
    signals: Signals,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                let shared = Arc::clone(&shared);
                let lcfg = Arc::clone(&lcfg);
                let signals = signals.clone();
                shared.active.fetch_add(1, Ordering::Relaxed);
                // Boxed: a session's future is many KB, and tokio copies the future
                // (and every stage that replaces it) into and within its task cell;
                // a pointer moves for free (~2,000 instructions per connection).
                tokio::spawn(Box::pin(async move {
                    handle(&shared, &lcfg, tcp, addr, signals).await;
                    shared.active.fetch_sub(1, Ordering::Relaxed);
                }));
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                error!(listener = %lcfg.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn handle(
    shared: &Arc<Shared>,
    lcfg: &ListenerConfig,
    mut tcp: TcpStream,
    addr: SocketAddr,
    signals: Signals,
) {
    // Replies are written whole, one per flush: no reason to hold them back. On
    // Linux the socket has it from the listener (`bind`).
    if !cfg!(target_os = "linux") {
        let _ = tcp.set_nodelay(true);
    }
    let mut client = addr;
    // A PROXY header without a client address (v1 UNKNOWN, v2 LOCAL) comes from the
    // balancer itself, e.g. a health check: never grant it the balancer's relay rights.
    let mut anonymous = false;
    if lcfg.proxy_protocol {
        match proxy::read_proxy_header(&mut tcp, HANDSHAKE_TIMEOUT).await {
            Ok(h) => match h.source {
                // Loopback is in relay networks because only the pod itself (or
                // whoever may `kubectl port-forward` to it) can connect from there.
                // A PROXY header is whatever its sender wrote, so a loopback source
                // in it proves nothing: no relay rights for it.
                Some(src) if src.ip().to_canonical().is_loopback() => {
                    client = src;
                    anonymous = true;
                }
                Some(src) => client = src,
                None => anonymous = true,
            },
            Err(e) => {
                debug!(peer = %addr, error = %e, "bad PROXY protocol header");
                shared.metrics.connection_refused("proxy_protocol");
                return;
            }
        }
    }
    let ip = client.ip().to_canonical();
    let ours = shared.relay_allowed(ip);
    let slot = match shared.limits.try_acquire(ip, !ours, ours && !anonymous) {
        Ok(slot) => {
            if let Some(limit) = slot.made_room {
                shared.metrics.connection_evicted(limit.reason());
                info!(client = %client, limit = limit.reason(), "closed the session idle longest to admit a client");
            }
            slot
        }
        Err(refusal) => {
            shared.metrics.connection_refused(refusal.reason());
            debug!(client = %client, reason = refusal.reason(), "connection refused");
            let msg = format!(
                "421 4.7.0 {} Error: too many connections, try again later\r\n",
                shared.config.hostname
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(2), tcp.write_all(msg.as_bytes())).await;
            return;
        }
    };
    shared.metrics.connection_opened(&lcfg.name);
    let _open = OpenGuard(&shared.metrics);
    let mut tls_info = None;
    let stream = match (lcfg.tls, &shared.tls) {
        (TlsMode::Implicit, Some(tls)) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(tcp)).await {
                Ok(Ok(s)) => {
                    shared.metrics.tls_handshake(true);
                    tls_info = Some(conn::handshake_info(&s));
                    Stream::Tls(Box::new(s))
                }
                _ => {
                    shared.metrics.tls_handshake(false);
                    return;
                }
            }
        }
        _ => Stream::Plain(tcp),
    };
    let peer = Peer {
        ip: client.ip().to_canonical(),
        port: client.port(),
        listener: lcfg.name.clone(),
        relay_allowed: !anonymous && shared.relay_allowed(client.ip()),
        starttls_available: lcfg.tls == TlsMode::Starttls && shared.tls.is_some(),
        auth_available: shared.users.is_some(),
        tls: tls_info,
    };
    debug!(client = %client, listener = %lcfg.name, relay_allowed = peer.relay_allowed, "session start");
    let mut session = Session::new(shared.session.clone(), peer);
    if let Some(q) = &shared.quotas {
        session.set_ingress_policy(Arc::new(quota::QuotaPolicy(Arc::clone(q))));
    }
    if let Some(p) = &shared.senders {
        session.set_sender_policy(Arc::clone(p));
    }
    session.check_recipients(shared.suppression().is_some());
    let wake = signals.wakes.register(Arc::clone(&slot.evicted));
    Conn::new(stream, Arc::clone(shared), signals.closing, wake)
        .with_slot(slot)
        .run(session)
        .await;
}

struct OpenGuard<'a>(&'a Metrics);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}
