//! One SMTP connection: reads lines and message octets from the socket, feeds them
//! to the [`Session`] state machine, and carries out its steps (replies, STARTTLS,
//! queue writes). Every wait is bounded by a timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::Shared;
use mailrelay_smtp::envelope::TlsInfo;
use mailrelay_smtp::{Reply, Session, Step, StoreFailure};

/// The socket, before or after a TLS upgrade.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Momentarily, while the socket is inside the TLS acceptor.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket detached")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

/// Why a session ended early.
#[derive(Debug)]
enum End {
    /// Peer closed or the socket failed.
    Gone,
    /// A read timed out; the reply has not been sent yet.
    Timeout,
    /// Graceful shutdown reached its deadline.
    Shutdown,
    /// The session was idle while the relay was full, and gave its slot to a newcomer.
    Evicted,
    /// A deadline, rate or size limit was broken: send `reply`, count `reason`, close.
    Cut { reply: Reply, reason: &'static str },
}

/// The deadline and minimum rate of one message's content (DATA, or all BDAT
/// chunks of a transaction). A per-read idle timer alone lets a client that
/// trickles a byte now and then hold its connection slot until `session_timeout`.
struct DataClock {
    deadline: Instant,
    window: Duration,
    /// Octets each window must bring; 0 when the rate check is off.
    min_bytes: u64,
    window_end: Instant,
    window_bytes: u64,
}

impl DataClock {
    fn new(l: &crate::config::Limits) -> Self {
        let now = Instant::now();
        let window_secs = l.data_rate_window.as_secs_f64();
        DataClock {
            deadline: now + l.data_deadline,
            window: l.data_rate_window,
            min_bytes: (l.data_min_rate as f64 * window_secs).ceil() as u64,
            window_end: now + l.data_rate_window,
            window_bytes: 0,
        }
    }

    /// How long the next read may wait, given the idle limit `idle`.
    fn wait(&self, idle: Duration) -> Duration {
        let now = Instant::now();
        let mut w = idle.min(self.deadline.saturating_duration_since(now));
        if self.min_bytes > 0 {
            w = w.min(self.window_end.saturating_duration_since(now));
        }
        w
    }

    /// Counts received octets and checks the limits (also after a read timed out).
    fn check(&mut self, received: u64, hostname: &str) -> Result<(), End> {
        self.window_bytes += received;
        let now = Instant::now();
        if now >= self.deadline {
            return Err(End::Cut {
                reply: Reply::status(
                    421,
                    (4, 4, 2),
                    format!("{hostname} Error: message data not completed in time"),
                ),
                reason: "data_deadline",
            });
        }
        if self.min_bytes > 0 && now >= self.window_end {
            if self.window_bytes < self.min_bytes {
                return Err(End::Cut {
                    reply: Reply::status(
                        421,
                        (4, 4, 2),
                        format!("{hostname} Error: message data arriving too slowly"),
                    ),
                    reason: "data_too_slow",
                });
            }
            self.window_end = now + self.window;
            self.window_bytes = 0;
        }
        Ok(())
    }
}

/// Read size while expecting commands (pipelined groups are small).
const COMMAND_CHUNK: usize = 4096;
/// Read size for message content.
const DATA_CHUNK: usize = 64 * 1024;
/// Largest buffer an idle session keeps.
const IDLE_BUFFER: usize = 8192;

pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Start of unconsumed input in `buf`.
    pos: usize,
    out: Vec<u8>,
    shared: Arc<Shared>,
    deadline: Instant,
    /// Becomes true when the shutdown's grace period is over (waits other than
    /// reads use it; reads use `wake`).
    closing: watch::Receiver<bool>,
    /// The quota charge of the message being queued, refunded if the write fails.
    charged: Option<crate::quota::Charged>,
    /// Runs across the chunks of a BDAT transaction.
    bdat_clock: Option<DataClock>,
    /// This session's connection slot: marked idle between commands, and rung
    /// when the session is evicted for a newcomer.
    slot: Option<super::limits::ConnSlot>,
    /// What the slot was last told: it is told only on a change (each call takes the
    /// limits lock and a map lookup, and a message's commands mostly repeat it).
    idle_marked: bool,
    /// The one read timer of the session, made on the first read and kept. A timer
    /// per read would be registered and cancelled in the timer wheel each time
    /// (~24 k instructions per message); this one is left armed when a later read
    /// wants a later deadline and re-armed only when it fires early (see `fill`).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Raised by shutdown and eviction; every read races it (see [`super::wake`]).
    wake: super::wake::Registered,
}

enum Line {
    Complete(Vec<u8>),
    TooLong,
}

impl Conn {
    pub fn new(
        stream: Stream,
        shared: Arc<Shared>,
        closing: watch::Receiver<bool>,
        wake: super::wake::Registered,
    ) -> Self {
        let deadline = Instant::now() + shared.config.limits.session_timeout;
        Conn {
            stream,
            buf: Vec::new(),
            pos: 0,
            out: Vec::new(),
            shared,
            deadline,
            closing,
            charged: None,
            bdat_clock: None,
            slot: None,
            idle_marked: false,
            timer: None,
            wake,
        }
    }

    pub fn with_slot(mut self, slot: super::limits::ConnSlot) -> Self {
        self.slot = Some(slot);
        self
    }

    fn set_idle(&mut self, idle: bool) {
        if idle == self.idle_marked {
            return;
        }
        self.idle_marked = idle;
        if let Some(s) = &self.slot {
            s.set_idle(idle);
        }
    }

    fn push(&mut self, reply: &Reply) {
        reply.write_to(&mut self.out);
    }

    /// Writes pending replies. Bounded like reads: a client that stops reading must
    /// not hold its connection slot (or delay shutdown) forever.
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Replies are small and the socket's send buffer almost always takes them
        // whole: try that first, without arming a timer and a shutdown watch per
        // reply. Whatever is left waits below, bounded as before.
        let mut sent = 0;
        if let Stream::Plain(tcp) = &self.stream
            && !*self.closing.borrow()
        {
            while sent < self.out.len() {
                match tcp.try_write(&self.out[sent..]) {
                    Ok(0) => {
                        self.out.clear();
                        return Err(End::Gone);
                    }
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.out.clear();
                        return Err(End::Gone);
                    }
                }
            }
            if sent == self.out.len() {
                self.out.clear();
                return Ok(());
            }
        }
        let limit = self
            .shared
            .config
            .limits
            .command_timeout
            .min(self.deadline.saturating_duration_since(Instant::now()));
        let mut closing = self.closing.clone();
        let (stream, out) = (&mut self.stream, &self.out[sent..]);
        let write = async move {
            stream.write_all(out).await?;
            stream.flush().await
        };
        let result = tokio::select! {
            r = tokio::time::timeout(limit, write) => match r {
                Ok(Ok(())) => Ok(()),
                // Nothing more can be said to a client that does not read.
                Ok(Err(_)) | Err(_) => Err(End::Gone),
            },
            _ = closing.wait_for(|v| *v) => Err(End::Gone),
        };
        self.out.clear();
        result
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn compact(&mut self) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos > 8192) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Reads more input. Pending replies are flushed first: with PIPELINING the
    /// client may be waiting for them before it sends more (RFC 2920 §3.2).
    async fn fill(&mut self, timeout: Duration, idle: bool, chunk: usize) -> Result<u64, End> {
        self.flush().await?;
        self.compact();
        if self.pos == self.buf.len() && self.buf.capacity() > IDLE_BUFFER {
            // Idle sessions can number in the tens of thousands: do not let each one
            // keep the buffer its last message needed.
            self.buf = Vec::new();
            self.pos = 0;
        }
        let limit = timeout.min(self.deadline.saturating_duration_since(Instant::now()));
        let want = tokio::time::Instant::now() + limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(want)));
        // An earlier deadline must be armed now; a later one waits until the armed
        // timer fires (most reads end long before it does).
        if want < timer.deadline() {
            timer.as_mut().reset(want);
        }
        let start = self.buf.len();
        let wake = &*self.wake.wake;
        let (stream, buf) = (&mut self.stream, &mut self.buf);
        let read = async move {
            // A plain socket is awaited without a buffer, so a waiting session holds
            // no read buffer at all.
            if let Stream::Plain(tcp) = &*stream {
                tcp.readable().await?;
            }
            // Reading into spare capacity: no zero-filling of a 64 KB buffer per read.
            buf.reserve(chunk);
            // Through `poll_read` rather than `try_read_buf`: a read that does not fill
            // the buffer tells tokio the socket is drained, so the next wait does not
            // start with a read that only finds EAGAIN (~3 per message).
            stream.read_buf(buf).await
        };
        // As `tokio::time::timeout` (the read is polled first, so input that is
        // there wins over a timer that fired too), but with the session's timer;
        // shutdown and eviction are looked at before either.
        let result = {
            let mut read = std::pin::pin!(read);
            std::future::poll_fn(|cx| {
                use super::wake::{CLOSING, DRAINING, EVICTED};
                let raised = wake.poll(cx);
                if raised & CLOSING != 0 || (idle && raised & DRAINING != 0) {
                    return Poll::Ready(Err(End::Shutdown));
                }
                // Rung only while waiting for a command outside a transaction (a partial
                // line included: a trickled command is no progress).
                if raised & EVICTED != 0 {
                    return Poll::Ready(Err(End::Evicted));
                }
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(match r {
                        Ok(0) | Err(_) => Err(End::Gone),
                        Ok(n) => Ok(n),
                    });
                }
                while timer.as_mut().poll(cx).is_ready() {
                    if timer.deadline() >= want {
                        return Poll::Ready(Err(End::Timeout));
                    }
                    // Armed for an earlier read: this one may wait longer.
                    timer.as_mut().reset(want);
                }
                Poll::Pending
            })
            .await
        };
        match result {
            Ok(n) => {
                self.buf.truncate(start + n);
                Ok(n as u64)
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    async fn read_line(&mut self, max: usize, idle: bool) -> Result<Line, End> {
        let timeout = self.shared.config.limits.command_timeout;
        let mut discarding = false;
        // `command_timeout` bounds the wait for a line's first octet, and then the
        // whole line from that octet on: a client trickling one octet at a time
        // must not keep a line (and its connection slot) open indefinitely.
        let mut line_deadline: Option<Instant> = None;
        loop {
            if let Some(i) = self.buffered().iter().position(|&b| b == b'\n') {
                let end = self.pos + i + 1;
                let line = self.buf[self.pos..end].to_vec();
                self.pos = end;
                return Ok(if discarding || line.len() > max {
                    Line::TooLong
                } else {
                    Line::Complete(line)
                });
            }
            if self.buffered().len() > max {
                // Keep memory bounded: drop the overlong line as it arrives.
                discarding = true;
                self.pos = self.buf.len();
            }
            let idle_now = idle && self.buffered().is_empty() && !discarding;
            if !idle_now && line_deadline.is_none() && (discarding || !self.buffered().is_empty()) {
                line_deadline = Some(Instant::now() + timeout);
            }
            let wait = match line_deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => timeout,
            };
            let late = || line_deadline.is_some_and(|d| Instant::now() >= d);
            if wait.is_zero() && late() {
                return Err(self.line_deadline_cut());
            }
            match self.fill(wait, idle_now, COMMAND_CHUNK).await {
                Err(End::Timeout) if late() => return Err(self.line_deadline_cut()),
                r => r?,
            };
        }
    }

    fn line_deadline_cut(&self) -> End {
        End::Cut {
            reply: Reply::status(
                421,
                (4, 4, 2),
                format!(
                    "{} Error: command line not completed in time",
                    self.shared.config.hostname
                ),
            ),
            reason: "command_deadline",
        }
    }

    /// Runs the session to its end.
    pub async fn run(mut self, mut session: Session) {
        let metrics = Arc::clone(&self.shared.metrics);
        self.push(&session.greeting());
        let end = self.serve(&mut session).await;
        let reply = match &end {
            Ok(()) => None,
            Err(End::Gone) => None,
            Err(End::Timeout) => Some(Reply::status(
                421,
                (4, 4, 2),
                format!("{} Error: timeout exceeded", self.shared.config.hostname),
            )),
            Err(End::Cut { reply, reason }) => {
                metrics.rejected(reason);
                info!(client = %session.peer().ip, reason = *reason, "connection cut");
                Some(reply.clone())
            }
            Err(End::Evicted) => {
                info!(client = %session.peer().ip, "idle session closed to admit a new client");
                Some(Reply::status(
                    421,
                    (4, 7, 0),
                    format!(
                        "{} Error: server busy, closing idle connection",
                        self.shared.config.hostname
                    ),
                ))
            }
            Err(End::Shutdown) => Some(Reply::status(
                421,
                (4, 3, 2),
                format!(
                    "{} Service shutting down, try again later",
                    self.shared.config.hostname
                ),
            )),
        };
        if let Some(r) = reply {
            if matches!(end, Err(End::Timeout)) {
                metrics.rejected("timeout");
            }
            self.push(&r);
        }
        // The last words go out even after the shutdown deadline, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.stream.write_all(&self.out).await;
            // Also on a plain socket, although the close sends a FIN too: a client
            // that pipelined a command behind our last reply leaves unread input,
            // and a close with unread input resets the connection (RST, no FIN), so
            // the client may never read that reply. The FIN of `shutdown` goes
            // first, in order after the reply.
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    async fn serve(&mut self, session: &mut Session) -> Result<(), End> {
        loop {
            if !session.bdat_in_progress() {
                self.bdat_clock = None;
            }
            let idle = !session.in_transaction();
            self.set_idle(idle);
            let line = self.read_line(session.max_line(), idle).await;
            self.set_idle(false);
            let line = line?;
            let mut step = match line {
                Line::Complete(l) => session.on_line(&l),
                Line::TooLong => session.line_too_long(),
            };
            self.shared.metrics.command(session.last_verb());
            loop {
                if let Some(reason) = session.take_rejection() {
                    self.shared.metrics.rejected(reason);
                }
                if let Some(refusal) = session.take_sender_refusal() {
                    self.shared.metrics.sender_refused(refusal.stage);
                    warn!(
                        client = %session.peer().ip,
                        subject = %refusal.subject,
                        sender = %refusal.sender,
                        stage = refusal.stage,
                        rule = %refusal.rule,
                        "sender not allowed"
                    );
                }
                match step {
                    Step::Reply(r) => {
                        if r.is_permanent_failure() {
                            debug!(client = %session.peer().ip, reply = %r, "command refused");
                        }
                        self.push(&r);
                        break;
                    }
                    Step::Close(r) => {
                        if let Some(reason) = session.take_rejection() {
                            self.shared.metrics.rejected(reason);
                        }
                        self.push(&r);
                        return Ok(());
                    }
                    Step::StartTls(r) => {
                        self.push(&r);
                        self.flush().await?;
                        self.start_tls(session).await?;
                        break;
                    }
                    Step::ReadData(r) => {
                        self.push(&r);
                        step = self.read_data(session).await?;
                        step = self.dkim_sign(step);
                    }
                    Step::ReadChunk { size } => {
                        self.read_chunk(session, size).await?;
                        step = session
                            .chunk_end(self.shared.queue.new_id(), time::OffsetDateTime::now_utc());
                        step = self.dkim_sign(step);
                    }
                    Step::CheckCredentials { username, password } => {
                        step = self.check_credentials(session, username, password).await?;
                    }
                    Step::CheckQuota(msg) => {
                        let started = Instant::now();
                        match self.check_quota(&msg).await {
                            QuotaStep::Checked(refusal) => {
                                if refusal.as_ref().is_some_and(|r| r.reason == "queue_full") {
                                    // The check was the queue write too.
                                    self.shared
                                        .metrics
                                        .queue_write(started.elapsed(), Some("full"));
                                    warn!(queue_id = %msg.envelope.id, "queue store full; answered 451 until delivery frees space");
                                }
                                step = session.quota_result(msg, refusal);
                            }
                            QuotaStep::Queued => {
                                // Checked and stored in one call: the write is done.
                                self.note_write(&msg, Ok(()), started.elapsed(), None);
                                let r = session.enqueue_result(&msg.envelope.id, Ok(()));
                                self.push(&r);
                                break;
                            }
                        }
                    }
                    Step::Enqueue(msg) => {
                        let r = self.enqueue(session, *msg).await;
                        self.push(&r);
                        break;
                    }
                    Step::CheckRecipient(check) => {
                        let verdict = self.check_recipient(&check).await;
                        step = session.recipient_result(verdict);
                    }
                }
            }
            if let Some(reason) = session.take_rejection() {
                self.shared.metrics.rejected(reason);
            }
        }
    }

    /// Checks AUTH credentials behind the throttle: an attempt waits out the delay
    /// its address's and user's earlier failures earned, and a locked-out one is
    /// refused before the password is looked at.
    async fn check_credentials(
        &mut self,
        session: &mut Session,
        username: String,
        password: String,
    ) -> Result<Step, End> {
        let ip = session.peer().ip;
        let throttle = self.shared.auth_throttle().cloned();
        let subjects = crate::server::auth_throttle::Subjects::new(ip, &username);
        if let Some(t) = &throttle {
            use crate::server::auth_throttle::Verdict;
            match t.before(&subjects).await {
                Verdict::Proceed(delay) if !delay.is_zero() => {
                    debug!(client = %ip, user = %subjects.user, delay = ?delay, "AUTH attempt delayed after earlier failures");
                    self.flush().await?;
                    let mut closing = self.closing.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closing.wait_for(|v| *v) => return Err(End::Shutdown),
                    }
                }
                Verdict::Proceed(_) => {}
                Verdict::Locked => {
                    // The same answer for every user, existing or not.
                    warn!(client = %ip, user = %subjects.user, "authentication refused: address or user locked out after repeated failures");
                    return Ok(session.auth_unavailable());
                }
                Verdict::Unavailable => return Ok(session.auth_unavailable()),
            }
        }
        let ok = self
            .shared
            .users
            .as_ref()
            .is_some_and(|u| u.current().verify(&username, &password));
        drop(password);
        if ok {
            info!(client = %ip, user = %subjects.user, "authenticated");
            self.shared.limits.note_authenticated(ip);
            if let Some(t) = &throttle {
                t.succeeded(&subjects).await;
            }
        } else {
            // The user name is logged for abuse tracking; the password never is.
            warn!(client = %ip, user = %subjects.user, "authentication failed");
            if let Some(t) = &throttle {
                let r = t.failed(&subjects).await;
                if r.address_locked {
                    warn!(client = %ip, "AUTH lockout of the client address begins");
                }
                if r.user_locked {
                    warn!(user = %subjects.user, "AUTH lockout of the user begins");
                }
            }
        }
        Ok(session.auth_result(username, ok))
    }

    async fn start_tls(&mut self, session: &mut Session) -> Result<(), End> {
        let Some(tls) = self.shared.tls.as_ref() else {
            return Err(End::Gone);
        };
        // Anything the client pipelined after STARTTLS was sent in the clear and must
        // not be executed inside TLS (CVE-2011-0411).
        self.buf.clear();
        self.pos = 0;
        let plain = match std::mem::replace(&mut self.stream, Stream::Detached) {
            Stream::Plain(s) => s,
            Stream::Tls(_) | Stream::Detached => return Err(End::Gone),
        };
        let acceptor = tls.acceptor();
        let limit = self
            .shared
            .config
            .limits
            .command_timeout
            .min(Duration::from_secs(60));
        match tokio::time::timeout(limit, acceptor.accept(plain)).await {
            Ok(Ok(tls_stream)) => {
                let info = super::tls::tls_info(tls_stream.get_ref().1);
                self.shared.metrics.tls_handshake(true);
                debug!(client = %session.peer().ip, version = %info.version, cipher = %info.cipher, "STARTTLS");
                self.stream = Stream::Tls(Box::new(tls_stream));
                session.tls_started(info);
                Ok(())
            }
            _ => {
                self.shared.metrics.tls_handshake(false);
                Err(End::Gone)
            }
        }
    }

    async fn read_data(&mut self, session: &mut Session) -> Result<Step, End> {
        let limits = &self.shared.config.limits;
        let mut clock = DataClock::new(limits);
        // Past this, draining an oversized message to answer 552 in sync is not
        // worth the connection slot any more.
        let drain_limit = limits
            .max_message_size
            .saturating_add(limits.data_oversize_drain);
        loop {
            if !self.buffered().is_empty() {
                let avail = self.buffered().len() as u64;
                let consumed = session.data_feed(&self.buf[self.pos..]);
                match consumed {
                    Some(n) => {
                        self.pos += n;
                        return Ok(session.data_end(
                            self.shared.queue.new_id(),
                            time::OffsetDateTime::now_utc(),
                        ));
                    }
                    None => self.pos = self.buf.len(),
                }
                clock.check(avail, &self.shared.config.hostname)?;
                if session.data_size() > drain_limit {
                    return Err(End::Cut {
                        reply: Reply::status(
                            552,
                            (5, 3, 4),
                            "Error: message size exceeds fixed maximum message size; closing",
                        ),
                        reason: "message_too_big",
                    });
                }
            }
            if self.fill_data(&mut clock).await? == 0 {
                // Only a rate window or the deadline ended: judge it now.
                clock.check(0, &self.shared.config.hostname)?;
            }
        }
    }

    /// One read of message content, bounded by `data_timeout` (idle), the data
    /// deadline, the rate window and the session ceiling. Returns the octets read
    /// (0 when only a rate window or the deadline ended, which the caller judges).
    async fn fill_data(&mut self, clock: &mut DataClock) -> Result<u64, End> {
        let idle = self.shared.config.limits.data_timeout;
        let idle_end = Instant::now() + idle;
        match self.fill(clock.wait(idle), false, DATA_CHUNK).await {
            Err(End::Timeout) => {
                let now = Instant::now();
                if now >= idle_end || now >= self.deadline {
                    return Err(End::Timeout);
                }
                Ok(0)
            }
            r => r,
        }
    }

    async fn read_chunk(&mut self, session: &mut Session, size: u64) -> Result<(), End> {
        let mut clock = self
            .bdat_clock
            .take()
            .unwrap_or_else(|| DataClock::new(&self.shared.config.limits));
        let r = self.read_chunk_with(session, size, &mut clock).await;
        self.bdat_clock = Some(clock);
        r
    }

    async fn read_chunk_with(
        &mut self,
        session: &mut Session,
        size: u64,
        clock: &mut DataClock,
    ) -> Result<(), End> {
        let mut left = size;
        loop {
            let avail = self.buffered().len() as u64;
            let take = avail.min(left) as usize;
            if take > 0 {
                session.chunk_feed(&self.buf[self.pos..self.pos + take]);
                self.pos += take;
                left -= take as u64;
            }
            // Judged even when the chunk came complete with its command: a stream of
            // tiny chunks is as slow as a trickle.
            clock.check(take as u64, &self.shared.config.hostname)?;
            if left == 0 {
                return Ok(());
            }
            if self.fill_data(clock).await? == 0 {
                clock.check(0, &self.shared.config.hostname)?;
            }
        }
    }

    /// The authoritative quota check of a complete message (one counter-store round
    /// trip, which with standalone Redis also stores the message); keeps the charge
    /// for a refund should a separate queue write fail.
    async fn check_quota(&mut self, msg: &crate::queue::QueuedMessage) -> QuotaStep {
        let Some(quotas) = self.shared.quotas.as_ref() else {
            return QuotaStep::Checked(None);
        };
        let held = |held: &[String]| {
            if !held.is_empty() {
                info!(queue_id = %msg.envelope.id, quotas = %held.join(","), "accepted; held by quota until its window allows");
            }
        };
        match quotas.admit(msg).await {
            crate::quota::Admission::Accept { charged, held: h } => {
                held(&h);
                self.charged = charged;
                QuotaStep::Checked(None)
            }
            crate::quota::Admission::Queued { held: h } => {
                held(&h);
                QuotaStep::Queued
            }
            crate::quota::Admission::Refuse(r) => {
                debug!(client = %msg.envelope.client.ip, from = %msg.envelope.mail.from, reply = %r.reply, "refused by quota");
                QuotaStep::Checked(Some(super::quota::refusal(r)))
            }
        }
    }

    /// A recipient against the suppression lists. A store that cannot answer
    /// does not stop mail: the recipient is accepted (and the failure logged).
    async fn check_recipient(
        &self,
        c: &mailrelay_smtp::session::RecipientCheck,
    ) -> mailrelay_smtp::session::RecipientVerdict {
        use crate::config::suppression::OnSuppressed;
        use crate::events::suppression::Verdict;
        use mailrelay_smtp::session::RecipientVerdict;
        let Some(sup) = self.shared.suppression() else {
            return RecipientVerdict::Accept;
        };
        match sup
            .check(&c.sender, c.auth_user.as_deref(), &c.recipient)
            .await
        {
            Ok(Verdict::Accept) => RecipientVerdict::Accept,
            Ok(Verdict::Suppressed { scope }) => {
                let action = sup.on_suppressed();
                self.shared.metrics.suppressed(match action {
                    OnSuppressed::Reject => "rejected",
                    OnSuppressed::Drop => "dropped",
                });
                info!(to = %c.recipient, from = %c.sender, scope = %scope, action = ?action, "recipient is suppressed");
                if let Some(sink) = self.shared.events() {
                    sink.record(suppressed_event(c, &scope, action));
                }
                match action {
                    OnSuppressed::Drop => RecipientVerdict::Drop,
                    OnSuppressed::Reject => {
                        RecipientVerdict::Refuse(mailrelay_smtp::policy::Refusal {
                            reply: Reply::status(
                                550,
                                (5, 1, 1),
                                format!(
                                    "<{}>: recipient is on the suppression list ({scope}) after earlier hard bounces",
                                    c.recipient
                                ),
                            ),
                            reason: "suppressed",
                            quota: None,
                        })
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, to = %c.recipient, "suppression check failed; recipient accepted");
                self.shared.metrics.suppressed("check_failed");
                RecipientVerdict::Accept
            }
        }
    }

    /// Signs a complete message before anything stores it (the quota check may be
    /// the queue write), or answers the `550` its unsigned policy asks for; the
    /// session already ended the transaction when it built the message.
    fn dkim_sign(&mut self, step: Step) -> Step {
        let Some(dkim) = self.shared.dkim() else {
            return step;
        };
        if !matches!(step, Step::CheckQuota(_) | Step::Enqueue(_)) {
            return step;
        }
        let mut msg = step;
        let (Step::CheckQuota(m) | Step::Enqueue(m)) = &mut msg else {
            unreachable!("checked above")
        };
        let now = (m.envelope.received_at_ms / 1000).max(1);
        match dkim.sign_accepted(&mut m.body, now) {
            crate::dkim::Outcome::Signed { domain, signatures } => {
                debug!(queue_id = %m.envelope.id, domain = %domain, signatures, "DKIM signed");
                msg
            }
            crate::dkim::Outcome::Unsigned { reason } => {
                debug!(queue_id = %m.envelope.id, reason = %reason, "sent without a DKIM signature (unsigned_policy allow)");
                msg
            }
            crate::dkim::Outcome::Refused { reason } => {
                info!(queue_id = %m.envelope.id, client = %m.envelope.client.ip, from = %m.envelope.mail.from, reason = %reason, "refused: unsigned_policy reject");
                self.shared.metrics.rejected("dkim_unsigned");
                Step::Reply(Reply::new(
                    550,
                    Some(mailrelay_smtp::reply::Enhanced(5, 7, 26)),
                    format!("{reason} (unsigned mail refused by policy)"),
                ))
            }
        }
    }

    /// The `accepted` event of `msg`.
    fn accepted_event(msg: &crate::queue::QueuedMessage) -> mailrelay_admin_api::Event {
        use crate::events::log::{event_for, message_id_of};
        let mut e = event_for(
            mailrelay_admin_api::EventKind::Accepted,
            msg,
            message_id_of(&msg.body).as_deref(),
        );
        e.at_ms = msg.envelope.received_at_ms;
        e
    }

    /// Metrics of a queue write, and the `queued` log line when it stored the
    /// message. `accepted`: the event the queue wrote with the message, if it did;
    /// otherwise one is recorded through the event batch.
    fn note_write(
        &self,
        msg: &crate::queue::QueuedMessage,
        result: Result<(), StoreFailure>,
        elapsed: Duration,
        accepted: Option<&mailrelay_admin_api::Event>,
    ) {
        self.shared
            .metrics
            .queue_write(elapsed, result.err().map(StoreFailure::reason));
        if result.is_ok() {
            self.shared.queued();
            self.shared.metrics.accepted(msg.body.len() as u64);
            if let Some(sink) = self.shared.events() {
                match accepted {
                    Some(e) => sink.written_elsewhere(e),
                    None => sink.record(Self::accepted_event(msg)),
                }
            }
            info!(
                queue_id = %msg.envelope.id,
                from = %msg.envelope.mail.from,
                nrcpt = msg.envelope.recipients.len(),
                size = msg.body.len(),
                client = %msg.envelope.client.ip,
                tls = msg.envelope.client.tls.is_some(),
                "queued"
            );
        }
    }

    async fn enqueue(&mut self, session: &mut Session, msg: crate::queue::QueuedMessage) -> Reply {
        let id = msg.envelope.id.clone();
        let started = Instant::now();
        let limit = self.shared.config.queue.write_timeout;
        // With events on, the `accepted` event goes into the queue's write where the
        // backend can (no crash window between the `250` and the event).
        let event = self.shared.events().and_then(|sink| {
            let e = Self::accepted_event(&msg);
            serde_json::to_vec(&e).ok().map(|j| (e, j, sink.max_len()))
        });
        let result = match &event {
            Some((_, json, max_len)) => {
                tokio::time::timeout(
                    limit,
                    self.shared.queue.enqueue_with_event(&msg, json, *max_len),
                )
                .await
            }
            None => {
                tokio::time::timeout(limit, async {
                    self.shared.queue.enqueue(&msg).await.map(|()| false)
                })
                .await
            }
        };
        let elapsed = started.elapsed();
        let outcome = match &result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.store_failure()),
            Err(_) => Err(StoreFailure::Timeout),
        };
        let written = match (&result, &event) {
            (Ok(Ok(true)), Some((e, _, _))) => Some(e),
            _ => None,
        };
        self.note_write(&msg, outcome, elapsed, written);
        match &result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                if outcome == Err(StoreFailure::Full) {
                    self.shared.metrics.rejected("queue_full");
                    warn!(queue_id = %id, error = %e, "queue store full; answered 451 until delivery frees space");
                } else {
                    self.shared.metrics.rejected("queue_unavailable");
                    warn!(queue_id = %id, error = %e, "queue write failed; answered 451");
                }
                // Best effort: the client will try again and be charged again. A
                // write that failed late may still have stored the message; then
                // this refund lets one more through. A timeout is not refunded:
                // the message may well be stored.
                if let (Some(c), Some(q)) = (self.charged.take(), &self.shared.quotas) {
                    q.refund(c).await;
                }
            }
            Err(_) => {
                self.shared.metrics.rejected("queue_timeout");
                warn!(queue_id = %id, timeout = ?limit, "queue write timed out; answered 451");
            }
        }
        self.charged = None;
        session.enqueue_result(&id, outcome)
    }
}

/// What the quota check of a complete message left to do.
enum QuotaStep {
    /// Checked (and charged if allowed); the session decides, the queue write follows.
    Checked(Option<mailrelay_smtp::policy::Refusal>),
    /// Checked, charged and already queued in the same call.
    Queued,
}

/// TLS details for sessions that start inside TLS (implicit TLS listeners).
pub fn handshake_info(s: &TlsStream<TcpStream>) -> TlsInfo {
    super::tls::tls_info(s.get_ref().1)
}

/// The `suppressed` event of a recipient refused (or dropped) at `RCPT`: no
/// message exists yet, so it has no queue id or Message-ID.
fn suppressed_event(
    c: &mailrelay_smtp::session::RecipientCheck,
    scope: &impl std::fmt::Display,
    action: crate::config::suppression::OnSuppressed,
) -> mailrelay_admin_api::Event {
    let tenant = c.auth_user.clone().unwrap_or_else(|| {
        c.sender
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    });
    mailrelay_admin_api::Event {
        id: String::new(),
        kind: mailrelay_admin_api::EventKind::Suppressed,
        at_ms: crate::queue::now_ms(),
        queue_id: String::new(),
        message_id: None,
        sender: c.sender.clone(),
        recipient: Some(c.recipient.clone()),
        auth_user: c.auth_user.clone(),
        tenant,
        category: None,
        reply: Some(format!("suppressed ({scope}): {action:?}")),
        mx: None,
        tls_version: None,
        tls_cipher: None,
        dsn_id: None,
    }
}
