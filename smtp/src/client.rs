//! The client side of SMTP as an IO-free state machine: one connection to one server,
//! carrying one or more queued messages.
//!
//! [`ClientSession`] makes every protocol decision (extensions, STARTTLS policy,
//! AUTH, PIPELINING, per-recipient outcomes, RSET between messages); the IO driver
//! in `delivery::smtp_client` only moves octets, upgrades to TLS and keeps time:
//!
//! ```text
//! loop {
//!     match session.next_action() {
//!         Action::Send(bytes)  => write them, or session.on_connection_error(..)
//!         Action::ReadReply    => parse_reply() from the socket, session.on_reply(reply)
//!         Action::StartTls     => handshake, session.on_tls_established(info) / on_tls_failed(..)
//!         Action::Done(out)    => the QUIT exchange is over: close, report `out`
//!         Action::Failed { .. } => close at once (no QUIT), report the outcomes
//!     }
//! }
//! ```
//!
//! Every recipient of every message handed to [`ClientSession::new`] ends with exactly
//! one [`RecipientOutcome`], whatever the server (or the network) does.

use std::collections::VecDeque;
use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::reply::{Enhanced, Reply};
use crate::envelope::{BodyType, DsnNotify, DsnRet, QueueId, QueuedMessage, TlsInfo};

/// A reply of more lines than this is refused (the longest real EHLO replies have
/// about 20); it bounds the memory a hostile server can make us hold.
pub const MAX_REPLY_LINES: usize = 100;
/// A reply longer than this (all lines together) is refused.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line: {0:?}")]
    Syntax(String),
    #[error("reply code changed from {first} to {found} within one multi-line reply")]
    InconsistentCode { first: u16, found: u16 },
    #[error("reply has more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    #[error("reply is longer than {MAX_REPLY_BYTES} octets")]
    TooLong,
}

/// Parses one complete reply from the start of `buf`: `Ok(Some((reply, consumed)))`,
/// or `Ok(None)` when more input is needed.
///
/// Liberal where servers are sloppy in practice: a bare LF ends a line like CRLF,
/// a bare `250` (no text) is a last line, and text that is not UTF-8 is converted
/// lossily. Strict where being lenient would desynchronise the conversation: every
/// line needs a three-digit code, all lines of one reply carry the same code, and
/// size is bounded ([`MAX_REPLY_LINES`], [`MAX_REPLY_BYTES`]).
///
/// An RFC 3463 enhanced status code after the reply code (its class matching the
/// reply's first digit) goes to [`Reply::enhanced`] and is removed from the text of
/// every line that repeats it.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code: Option<u16> = None;
    let mut texts: Vec<&[u8]> = Vec::new();
    loop {
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return if buf.len() > MAX_REPLY_BYTES {
                Err(ReplyError::TooLong)
            } else {
                Ok(None)
            };
        };
        let end = pos + nl + 1;
        if end > MAX_REPLY_BYTES {
            return Err(ReplyError::TooLong);
        }
        if texts.len() == MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let syntax = || ReplyError::Syntax(String::from_utf8_lossy(line).into_owned());
        let digits = line.get(..3).ok_or_else(syntax)?;
        if !(b'1'..=b'5').contains(&digits[0]) || !digits[1..].iter().all(u8::is_ascii_digit) {
            return Err(syntax());
        }
        let c = digits
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        let (last, text) = match line.get(3) {
            None => (true, &line[3..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(syntax()),
        };
        match code {
            Some(first) if first != c => {
                return Err(ReplyError::InconsistentCode { first, found: c });
            }
            _ => code = Some(c),
        }
        pos = end;
        if last && texts.is_empty() {
            // Most replies are one line: no list of lines to build.
            return Ok(Some((build_reply(c, &[text]), pos)));
        }
        texts.push(text);
        if last {
            return Ok(Some((build_reply(c, &texts), pos)));
        }
    }
}

fn build_reply(code: u16, texts: &[&[u8]]) -> Reply {
    // The code is found and stripped on the raw octets, so each line is converted
    // (and allocated) once. It is ASCII and ends at an ASCII octet, so this gives
    // what converting first and stripping after gave.
    let class = (code / 100) as u8;
    let enhanced = texts
        .first()
        .and_then(|l| parse_enhanced(l))
        .filter(|(e, _)| e.0 == class)
        .map(|(e, _)| e);
    let lines = texts
        .iter()
        .map(|&t| {
            let t = match enhanced.and_then(|e| parse_enhanced(t).filter(|(f, _)| *f == e)) {
                Some((_, len)) => &t[len..],
                None => t,
            };
            String::from_utf8_lossy(t).into_owned()
        })
        .collect();
    Reply {
        code,
        enhanced,
        lines,
    }
}

/// `class.subject.detail` (RFC 3463 §2: class one digit, subject and detail one to
/// three digits) followed by a space or the end of the text; returns the code and the
/// length to strip (including the space).
fn parse_enhanced(b: &[u8]) -> Option<(Enhanced, usize)> {
    let class = *b.first()?;
    if !matches!(class, b'2' | b'4' | b'5') || b.get(1) != Some(&b'.') {
        return None;
    }
    let number = |from: usize| -> Option<(u16, usize)> {
        let n = b[from..]
            .iter()
            .take(4)
            .take_while(|c| c.is_ascii_digit())
            .count();
        if !(1..=3).contains(&n) {
            return None;
        }
        let v = b[from..from + n]
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        Some((v, from + n))
    };
    let (subject, i) = number(2)?;
    if b.get(i) != Some(&b'.') {
        return None;
    }
    let (detail, j) = number(i + 1)?;
    let len = match b.get(j) {
        None => j,
        Some(b' ') => j + 1,
        Some(_) => return None,
    };
    Some((Enhanced(class - b'0', subject, detail), len))
}

/// What a server announced in its EHLO reply. A server greeted with HELO announces
/// nothing ([`Capabilities::default`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The server answered EHLO (not only HELO).
    pub esmtp: bool,
    /// The name the server gave on the first line of its EHLO reply.
    pub hostname: String,
    pub pipelining: bool,
    /// RFC 1870 SIZE: `Some(0)` when offered without a limit (the parameter may be
    /// sent, but there is nothing to check against).
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    pub chunking: bool,
    /// RFC 8689 REQUIRETLS.
    pub requiretls: bool,
    /// SASL mechanisms, upper case, in the server's order.
    pub auth: Vec<String>,
}

impl Capabilities {
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            esmtp: true,
            hostname: reply
                .lines
                .first()
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or_default()
                .to_owned(),
            ..Capabilities::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            let keyword = first.to_ascii_uppercase();
            // Old servers (Microsoft's among them) still write `AUTH=LOGIN PLAIN`.
            let (keyword, inline) = match keyword.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (keyword, None),
            };
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "DSN" => caps.dsn = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "CHUNKING" => caps.chunking = true,
                "REQUIRETLS" => caps.requiretls = true,
                "AUTH" => {
                    for mech in inline.into_iter().chain(words.map(str::to_owned)) {
                        let mech = mech.to_ascii_uppercase();
                        if !mech.is_empty() && !caps.auth.contains(&mech) {
                            caps.auth.push(mech);
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }
}

/// STARTTLS policy of outbound connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum TlsPolicy {
    /// Use STARTTLS when offered; deliver in plain text only when it is not offered
    /// (or the server refuses the command). Certificates are not verified.
    #[default]
    Opportunistic,
    /// Deliver only over TLS with a verified certificate; defer otherwise.
    Required,
    /// Never STARTTLS.
    Disabled,
    /// What the destination publishes decides (DANE per MX host, then MTA-STS), and
    /// opportunistic TLS where it publishes nothing. Delivery resolves it per
    /// destination before a session starts; a session given `auto` runs
    /// opportunistic TLS.
    Auto,
    /// DANE (RFC 7672) where the host publishes usable, DNSSEC-validated TLSA
    /// records, opportunistic TLS elsewhere; resolved per host like `auto`.
    Dane,
}

/// Credentials for a smarthost; only ever sent over TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Configs and sessions get logged; the password must never be.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Our name in EHLO/HELO.
    pub helo_name: String,
    pub tls: TlsPolicy,
    /// AUTH PLAIN (preferred) or LOGIN after STARTTLS; never without TLS.
    pub auth: Option<Credentials>,
    /// Use PIPELINING when the server offers it.
    pub pipelining: bool,
    /// Ask before each message ([`Action::Pace`]) whether it may start now: egress
    /// pacing holds it until its slot or ends the session before it.
    pub pace_messages: bool,
}

impl ClientConfig {
    pub fn new(helo_name: impl Into<String>) -> Self {
        ClientConfig {
            helo_name: helo_name.into(),
            tls: TlsPolicy::default(),
            auth: None,
            pipelining: true,
            pace_messages: false,
        }
    }
}

/// What happened to one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
}

impl Outcome {
    /// 2xx delivered, 5xx bounced, anything else (4xx, and codes that make no sense
    /// where they came) deferred: when in doubt, try again rather than lose mail.
    pub fn of_code(code: u16) -> Self {
        match code / 100 {
            2 => Outcome::Delivered,
            5 => Outcome::Bounced,
            _ => Outcome::Deferred,
        }
    }
}

/// Where in the conversation a recipient's outcome was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// TCP connect (decided by the caller; see [`connect_failed`]).
    Connect,
    Greeting,
    /// EHLO, or HELO after EHLO was refused.
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    /// The reply to the DATA command.
    Data,
    /// The reply after the message content (`.`).
    Message,
}

impl Stage {
    /// Lower-case name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::StartTls => "starttls",
            Stage::Auth => "auth",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Message => "message",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    pub address: String,
    pub result: Outcome,
    /// The reply that decided it.
    pub reply: Reply,
    pub stage: Stage,
    /// `reply` came from the server; false when we made it up (a local check such as
    /// SIZE, a lost connection, a policy), so a DSN must not quote it as the remote
    /// MTA's diagnostic.
    pub remote: bool,
}

impl RecipientOutcome {
    /// The enhanced status for a DSN: the server's, else the generic `X.0.0` of the
    /// reply's class (RFC 3463 §3.1).
    pub fn status(&self) -> Enhanced {
        self.reply.enhanced.unwrap_or(match self.result {
            Outcome::Delivered => Enhanced(2, 0, 0),
            Outcome::Deferred => Enhanced(4, 0, 0),
            Outcome::Bounced => Enhanced(5, 0, 0),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOutcome {
    pub id: QueueId,
    /// One per envelope recipient, in envelope order.
    pub recipients: Vec<RecipientOutcome>,
    /// MAIL FROM was sent for this message on this connection. False when it was
    /// refused locally (SIZE, SMTPUTF8) or the connection ended before its turn.
    pub attempted: bool,
    /// The message carried DSN parameters the server could not take (no DSN
    /// extension). RFC 3461 §4.2: recipients with NOTIFY=SUCCESS that were delivered
    /// are owed a `relayed` notification from us.
    pub dsn_unsupported: bool,
    /// Things done that an operator may want to know, e.g. an 8BITMIME body sent to
    /// a server that does not announce 8BITMIME.
    pub warnings: Vec<String>,
}

/// Outcomes for messages whose connection could not even be opened.
pub fn connect_failed(messages: &[&QueuedMessage], reason: &str) -> Vec<MessageOutcome> {
    let reply = Reply::status(421, (4, 4, 1), format!("connection failed: {reason}"));
    messages
        .iter()
        .map(|m| MessageOutcome {
            id: m.envelope.id.clone(),
            recipients: m
                .envelope
                .recipients
                .iter()
                .map(|r| RecipientOutcome {
                    address: r.address.clone(),
                    result: Outcome::Deferred,
                    reply: reply.clone(),
                    stage: Stage::Connect,
                    remote: false,
                })
                .collect(),
            attempted: false,
            dsn_unsupported: false,
            warnings: Vec::new(),
        })
        .collect()
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these octets, then ask for the next action.
    Send(Vec<u8>),
    /// Read one reply (see [`parse_reply`]) and pass it to [`ClientSession::on_reply`];
    /// [`ClientSession::timeout_kind`] says how long to wait.
    ReadReply,
    /// Discard anything already read (RFC 3207 §4.2: it was not protected), do the TLS
    /// handshake, then call [`ClientSession::on_tls_established`] or
    /// [`ClientSession::on_tls_failed`].
    StartTls,
    /// Only with [`ClientConfig::pace_messages`]: message `m` (an index into the
    /// messages given) is ready to start. Wait for its pacing slot, then call
    /// [`ClientSession::on_paced`], or [`ClientSession::on_pace_refused`] to leave it
    /// and every later message unattempted and end the session.
    Pace(usize),
    /// QUIT was exchanged: close the connection. One outcome per message given.
    Done(Vec<MessageOutcome>),
    /// The connection is unusable (421, lost, TLS failure, protocol violation): close
    /// it without QUIT. Outcomes are complete all the same.
    Failed {
        reason: String,
        outcomes: Vec<MessageOutcome>,
    },
}

/// Which RFC 5321 §4.5.3.2 timeout applies to the reply awaited now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Greeting,
    /// EHLO, HELO, STARTTLS, AUTH, RSET.
    Command,
    Mail,
    Rcpt,
    DataInit,
    /// The reply after the final dot.
    DataTermination,
    Quit,
}

/// Dot-stuffs `body` (RFC 5321 §4.5.2) into `out`: a `.` is added before every line
/// that starts with `.`. Lines are taken as ending at any LF so that not even a bare
/// LF followed by a dot can end the data early at a lenient server. Copies runs of
/// lines at a time, so MB-sized bodies cost little more than one `memcpy`.
pub fn dot_stuff_into(body: &[u8], out: &mut Vec<u8>) {
    // Only lines that start with a dot change: found with one SIMD search for
    // LF "." over the body (a search per line was ~2,000 instructions per 1 KB).
    let mut copied = 0;
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    for lf in memchr::memmem::find_iter(body, b"\n.") {
        out.extend_from_slice(&body[copied..=lf]);
        out.push(b'.');
        copied = lf + 1;
    }
    out.extend_from_slice(&body[copied..]);
}

/// What follows a `354`: the body dot-stuffed, completed with a CRLF when it does
/// not end with one, then `.` CRLF. An empty body is sent as just `.` CRLF.
pub fn encode_data(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 128 + 5);
    dot_stuff_into(body, &mut out);
    if needs_final_crlf(body) {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn needs_final_crlf(body: &[u8]) -> bool {
    !body.is_empty() && !body.ends_with(b"\r\n")
}

/// The RFC 1870 size of what [`encode_data`] sends (without stuffing and the dot).
fn wire_size(body: &[u8]) -> u64 {
    body.len() as u64 + if needs_final_crlf(body) { 2 } else { 0 }
}

/// RFC 6531 §3.2 lets a client leave SMTPUTF8 off when nothing needs it. Like
/// Postfix, a message needs it only when the envelope or the header section holds
/// non-ASCII (UTF-8 in the body alone is 8BITMIME's business).
fn needs_smtputf8(msg: &QueuedMessage) -> bool {
    let env = &msg.envelope;
    if !env.mail.from.is_ascii()
        || env
            .recipients
            .iter()
            .any(|r| !r.address.is_ascii() || r.orcpt.as_deref().is_some_and(|o| !o.is_ascii()))
    {
        return true;
    }
    let headers = match memchr::memmem::find(&msg.body, b"\r\n\r\n") {
        Some(end) => &msg.body[..end],
        None => &msg.body[..],
    };
    !headers.is_ascii()
}

/// Addresses and parameters come from our own queue and were checked at ingress,
/// but a damaged record must never be able to inject a command line.
fn unsafe_for_command(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

/// ESMTP parameter values (ENVID, ORCPT) must be single words.
fn safe_param(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_control() || c == ' ')
}

fn notify_param(n: &DsnNotify) -> Option<String> {
    if n.never {
        return Some("NEVER".into());
    }
    let parts: Vec<&str> = [
        (n.success, "SUCCESS"),
        (n.failure, "FAILURE"),
        (n.delay, "DELAY"),
    ]
    .into_iter()
    .filter_map(|(on, s)| on.then_some(s))
    .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

fn local(code: u16, esc: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::status(code, esc, text)
}

/// What the server's reply will answer, in the order the commands were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Mail,
    Rcpt(usize),
    Data,
    /// The reply after the content.
    Dot,
    /// The reply after a lone `.` sent only because a server accepted DATA for a
    /// transaction with no accepted recipient (RFC 2920 §3.1); it decides nothing.
    DotDiscard,
}

impl Expect {
    fn stage(self) -> Stage {
        match self {
            Expect::Mail => Stage::Mail,
            Expect::Rcpt(_) => Stage::Rcpt,
            Expect::Data | Expect::DotDiscard => Stage::Data,
            Expect::Dot => Stage::Message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthState {
    Plain,
    LoginStart,
    LoginUser,
    LoginPass,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    Auth(AuthState),
    /// `*` was sent to abandon a SASL exchange; the reply that failed it is kept.
    AuthCancel(Reply),
    Rset,
    /// Waiting for the pacer's answer about the message in `ClientSession::paced`.
    Pacing,
    Transaction,
    Quit,
    Finished,
}

/// A message ready to go: its command lines built, local checks passed.
#[derive(Debug)]
struct Prepared {
    msg: usize,
    mail: Vec<u8>,
    /// (recipient index in the envelope, RCPT line)
    rcpts: Vec<(usize, Vec<u8>)>,
}

#[derive(Debug)]
struct Transaction {
    msg: usize,
    rcpts: Vec<(usize, Vec<u8>)>,
    /// Index into `rcpts` of the next RCPT to send (without PIPELINING).
    next_rcpt: usize,
    mail_ok: bool,
    /// Envelope indexes of recipients accepted at RCPT.
    accepted: Vec<usize>,
    pending: VecDeque<Expect>,
}

#[derive(Debug, Default)]
struct MessageState {
    outcomes: Vec<Option<RecipientOutcome>>,
    attempted: bool,
    dsn_unsupported: bool,
    warnings: Vec<String>,
}

#[derive(Debug)]
pub struct ClientSession<'m> {
    cfg: ClientConfig,
    messages: Vec<&'m QueuedMessage>,
    states: Vec<MessageState>,
    state: State,
    actions: VecDeque<Action>,
    caps: Option<Capabilities>,
    tls: Option<TlsInfo>,
    /// What the caller found checking the TLS session's certificate (see
    /// [`ClientSession::on_tls_verified`]); `None`: not told.
    tls_verified: Option<Result<(), String>>,
    authenticated: bool,
    /// Index of the next message to start.
    next_msg: usize,
    tx: Option<Transaction>,
    /// Waiting for the RSET reply before this message can start.
    after_rset: Option<Prepared>,
    /// A transaction was opened (MAIL accepted) and not completed by a reply after
    /// the content: the server still holds its state, so RSET before the next MAIL.
    rset_needed: bool,
    /// The message waiting for its pacing slot (`State::Pacing`).
    paced: Option<Prepared>,
    /// Messages whose transaction ended (every recipient decided), not yet taken by
    /// [`ClientSession::take_completed`].
    completed: VecDeque<usize>,
}

impl<'m> ClientSession<'m> {
    /// A session over a freshly connected socket; the first action is to read the
    /// greeting. The caller decides how many messages share one connection.
    pub fn new(cfg: ClientConfig, messages: &[&'m QueuedMessage]) -> Self {
        let states = messages
            .iter()
            .map(|m| MessageState {
                outcomes: vec![None; m.envelope.recipients.len()],
                ..MessageState::default()
            })
            .collect();
        ClientSession {
            cfg,
            messages: messages.to_vec(),
            states,
            state: State::Greeting,
            actions: VecDeque::from([Action::ReadReply]),
            caps: None,
            tls: None,
            tls_verified: None,
            authenticated: false,
            next_msg: 0,
            tx: None,
            after_rset: None,
            rset_needed: false,
            paced: None,
            completed: VecDeque::new(),
        }
    }

    /// The next thing to do. After [`Action::Done`] or [`Action::Failed`] the session
    /// is over; asking again yields a `Failed` with no outcomes.
    pub fn next_action(&mut self) -> Action {
        self.actions.pop_front().unwrap_or_else(|| Action::Failed {
            reason: match self.state {
                State::Finished => "session already finished".into(),
                // Unreachable by construction: every event queues a next action.
                _ => "internal error: no action pending".into(),
            },
            outcomes: Vec::new(),
        })
    }

    /// What the server announced in its last EHLO reply.
    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.caps.as_ref()
    }

    /// The TLS session in use, once established.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The next message whose transaction has ended on this connection, with its
    /// outcome, as soon as the reply that ended it was read: the caller can record
    /// it now rather than when the connection is over. Its outcome does not change
    /// afterwards (the connection's result repeats it). Messages decided without a
    /// transaction of their own (a failed connection, a local refusal) are only in
    /// the connection's result.
    pub fn take_completed(&mut self) -> Option<(usize, MessageOutcome)> {
        let m = self.completed.pop_front()?;
        let s = self.states.get(m)?;
        Some((
            m,
            MessageOutcome {
                id: self.messages[m].envelope.id.clone(),
                recipients: s.outcomes.iter().flatten().cloned().collect(),
                attempted: s.attempted,
                dsn_unsupported: s.dsn_unsupported,
                warnings: s.warnings.clone(),
            },
        ))
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The timeout for the reply awaited now.
    pub fn timeout_kind(&self) -> TimeoutKind {
        match &self.state {
            State::Greeting => TimeoutKind::Greeting,
            State::Transaction => match self.tx.as_ref().and_then(|t| t.pending.front()) {
                Some(Expect::Mail) => TimeoutKind::Mail,
                Some(Expect::Rcpt(_)) => TimeoutKind::Rcpt,
                Some(Expect::Data) => TimeoutKind::DataInit,
                Some(Expect::Dot | Expect::DotDiscard) | None => TimeoutKind::DataTermination,
            },
            State::Quit | State::Finished => TimeoutKind::Quit,
            _ => TimeoutKind::Command,
        }
    }

    /// The stage a failure now would be charged to (and the stage the next reply
    /// answers).
    pub fn stage(&self) -> Stage {
        match &self.state {
            State::Greeting => Stage::Greeting,
            State::Ehlo | State::Helo => Stage::Ehlo,
            State::StartTls | State::TlsHandshake => Stage::StartTls,
            State::Auth(_) | State::AuthCancel(_) => Stage::Auth,
            State::Transaction => self
                .tx
                .as_ref()
                .and_then(|t| t.pending.front())
                .map_or(Stage::Mail, |e| e.stage()),
            State::Rset | State::Pacing | State::Quit | State::Finished => Stage::Mail,
        }
    }

    /// A reply arrived (the greeting first).
    pub fn on_reply(&mut self, reply: Reply) {
        // RFC 5321 §3.8: 421 means the server is closing the channel, whatever was
        // asked. Everything not yet decided is deferred.
        if reply.code == 421 && !matches!(self.state, State::Quit | State::Finished) {
            let stage = self.stage();
            self.settle_all(&reply, stage, Outcome::Deferred, true);
            self.fail(format!("server closing connection: {reply}"));
            return;
        }
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Greeting => self.on_greeting(reply),
            State::Ehlo => self.on_ehlo(reply),
            State::Helo => self.on_helo(reply),
            State::StartTls => self.on_starttls(reply),
            State::TlsHandshake => {
                self.protocol_error(Stage::StartTls, "reply received during TLS handshake")
            }
            State::Auth(step) => self.on_auth(step, reply),
            State::AuthCancel(failed) => {
                self.give_up(&failed, Stage::Auth, Outcome::Deferred, true)
            }
            State::Rset => self.on_rset(reply),
            State::Pacing => self.protocol_error(Stage::Mail, "reply nobody asked for"),
            State::Transaction => self.on_transaction_reply(reply),
            State::Quit => self.finish(),
            State::Finished => {}
        }
    }

    /// The TLS handshake after `StartTls` succeeded.
    /// Whether the certificate of the TLS session about to be reported by
    /// [`ClientSession::on_tls_established`] verified (chain and host name), and if
    /// not why: REQUIRETLS messages go only over a verified session.
    pub fn on_tls_verified(&mut self, verified: Result<(), String>) {
        self.tls_verified = Some(verified);
    }

    pub fn on_tls_established(&mut self, info: TlsInfo) {
        if self.state != State::TlsHandshake {
            self.protocol_error(self.stage(), "TLS established when none was requested");
            return;
        }
        self.tls = Some(info);
        // RFC 3207 §4.2: forget everything learnt before TLS and ask again.
        self.caps = None;
        self.send_ehlo();
    }

    /// The TLS handshake failed; the connection is unusable. Everything is deferred.
    /// (Postfix retries opportunistic TLS in plain text on a new connection; that is
    /// the caller's choice, seeing [`Stage::StartTls`].)
    pub fn on_tls_failed(&mut self, reason: &str) {
        if matches!(self.state, State::Finished) {
            return;
        }
        let reply = local(454, (4, 7, 5), format!("TLS handshake failed: {reason}"));
        self.settle_all(&reply, Stage::StartTls, Outcome::Deferred, false);
        self.fail(format!("TLS handshake failed: {reason}"));
    }

    /// Reading or writing failed, the server closed the connection, a timeout
    /// expired or a reply could not be parsed. Undecided recipients are deferred.
    /// While waiting for the QUIT reply this is not an error: all is decided.
    pub fn on_connection_error(&mut self, reason: &str) {
        match self.state {
            State::Finished => {}
            State::Quit => self.finish(),
            _ => {
                let stage = self.stage();
                let reply = local(
                    421,
                    (4, 4, 2),
                    format!("connection lost during {}: {reason}", stage.as_str()),
                );
                self.settle_all(&reply, stage, Outcome::Deferred, false);
                self.fail(format!(
                    "connection lost during {}: {reason}",
                    stage.as_str()
                ));
            }
        }
    }

    fn on_greeting(&mut self, reply: Reply) {
        if reply.code / 100 == 2 {
            self.send_ehlo();
        } else {
            // 4xx: the caller tries the next MX. 5xx (`554 no SMTP service here`) is
            // taken at its word and bounces; Postfix's smtp_skip_5xx_greeting would
            // rather try other MXs, which the caller can do seeing Stage::Greeting.
            let outcome = Outcome::of_code(reply.code);
            self.give_up(&reply, Stage::Greeting, outcome, true);
        }
    }

    fn send_ehlo(&mut self) {
        let line = format!("EHLO {}\r\n", self.cfg.helo_name);
        self.send(line.into_bytes());
        self.expect(State::Ehlo);
    }

    fn on_ehlo(&mut self, reply: Reply) {
        match reply.code / 100 {
            2 => {
                self.caps = Some(Capabilities::from_ehlo(&reply));
                self.after_hello();
            }
            // RFC 5321 §3.2: a server that does not know EHLO says so with 5xx.
            5 => {
                let line = format!("HELO {}\r\n", self.cfg.helo_name);
                self.send(line.into_bytes());
                self.expect(State::Helo);
            }
            _ => self.give_up(&reply, Stage::Ehlo, Outcome::Deferred, true),
        }
    }

    fn on_helo(&mut self, reply: Reply) {
        if reply.code / 100 == 2 {
            self.caps = Some(Capabilities::default());
            self.after_hello();
        } else {
            let outcome = Outcome::of_code(reply.code);
            self.give_up(&reply, Stage::Ehlo, outcome, true);
        }
    }

    fn after_hello(&mut self) {
        let offered = self.caps.as_ref().is_some_and(|c| c.starttls);
        if self.tls.is_none() {
            match (self.cfg.tls, offered) {
                (
                    TlsPolicy::Opportunistic
                    | TlsPolicy::Required
                    | TlsPolicy::Auto
                    | TlsPolicy::Dane,
                    true,
                ) => {
                    self.send(b"STARTTLS\r\n".to_vec());
                    self.expect(State::StartTls);
                    return;
                }
                (TlsPolicy::Required, false) => {
                    let reply = local(
                        454,
                        (4, 7, 4),
                        "STARTTLS not offered by the server, but TLS is required",
                    );
                    self.give_up(&reply, Stage::StartTls, Outcome::Deferred, false);
                    return;
                }
                _ => {}
            }
        }
        self.maybe_auth();
    }

    fn on_starttls(&mut self, reply: Reply) {
        if reply.code / 100 == 2 {
            self.actions.push_back(Action::StartTls);
            self.state = State::TlsHandshake;
        } else if self.cfg.tls == TlsPolicy::Required {
            // Our policy, not the message, is what fails: never bounce for it.
            self.give_up(&reply, Stage::StartTls, Outcome::Deferred, true);
        } else {
            // RFC 3207 §4: after a refusal the session goes on unprotected; that is
            // exactly what opportunistic TLS accepts.
            self.maybe_auth();
        }
    }

    fn maybe_auth(&mut self) {
        let Some(creds) = self.cfg.auth.clone() else {
            return self.start_next_message();
        };
        if self.authenticated {
            return self.start_next_message();
        }
        // Credentials in clear text would be readable by anyone on the path, and a
        // server that does not offer a mechanism we speak would most likely refuse
        // to relay: defer (our configuration is at fault, not the message).
        if self.tls.is_none() {
            let reply = local(
                454,
                (4, 7, 0),
                "not sending AUTH credentials over a connection without TLS",
            );
            return self.give_up(&reply, Stage::Auth, Outcome::Deferred, false);
        }
        let mechs = self
            .caps
            .as_ref()
            .map(|c| c.auth.clone())
            .unwrap_or_default();
        if mechs.iter().any(|m| m == "PLAIN") {
            let token = STANDARD.encode(format!("\0{}\0{}", creds.username, creds.password));
            self.send(format!("AUTH PLAIN {token}\r\n").into_bytes());
            self.expect(State::Auth(AuthState::Plain));
        } else if mechs.iter().any(|m| m == "LOGIN") {
            self.send(b"AUTH LOGIN\r\n".to_vec());
            self.expect(State::Auth(AuthState::LoginStart));
        } else {
            let reply = local(
                454,
                (4, 7, 0),
                "AUTH is configured but the server offers neither PLAIN nor LOGIN",
            );
            self.give_up(&reply, Stage::Auth, Outcome::Deferred, false);
        }
    }

    fn on_auth(&mut self, step: AuthState, reply: Reply) {
        let Some(creds) = self.cfg.auth.clone() else {
            return self.protocol_error(Stage::Auth, "AUTH reply without credentials");
        };
        match (step, reply.code / 100) {
            (AuthState::Plain | AuthState::LoginPass, 2) => {
                self.authenticated = true;
                self.start_next_message();
            }
            (AuthState::LoginStart, 3) => {
                self.send(format!("{}\r\n", STANDARD.encode(&creds.username)).into_bytes());
                self.expect(State::Auth(AuthState::LoginUser));
            }
            (AuthState::LoginUser, 3) => {
                self.send(format!("{}\r\n", STANDARD.encode(&creds.password)).into_bytes());
                self.expect(State::Auth(AuthState::LoginPass));
            }
            // The server wants more than we have: abandon the exchange (RFC 4954 §4).
            (_, 3) => {
                self.send(b"*\r\n".to_vec());
                self.expect(State::AuthCancel(reply));
            }
            // Like Postfix (smtp_sasl_auth_soft_bounce): a refused login is our
            // configuration's fault, so mail waits rather than bounces.
            _ => self.give_up(&reply, Stage::Auth, Outcome::Deferred, true),
        }
    }

    fn on_rset(&mut self, reply: Reply) {
        if reply.code / 100 == 2 {
            self.rset_needed = false;
            match self.after_rset.take() {
                Some(p) => self.begin(p),
                None => self.start_next_message(),
            }
        } else {
            // The server's transaction state is unknown now; stop using it.
            self.after_rset = None;
            self.give_up(&reply, Stage::Mail, Outcome::Deferred, true);
        }
    }

    /// Starts the next message that needs the server, or ends with QUIT.
    fn start_next_message(&mut self) {
        while self.next_msg < self.messages.len() {
            let m = self.next_msg;
            self.next_msg += 1;
            let Some(prepared) = self.prepare(m) else {
                continue;
            };
            if self.cfg.pace_messages {
                self.paced = Some(prepared);
                self.state = State::Pacing;
                self.actions.push_back(Action::Pace(m));
            } else {
                self.open_transaction(prepared);
            }
            return;
        }
        self.quit();
    }

    fn open_transaction(&mut self, prepared: Prepared) {
        if self.rset_needed {
            self.send(b"RSET\r\n".to_vec());
            self.after_rset = Some(prepared);
            self.expect(State::Rset);
        } else {
            self.begin(prepared);
        }
    }

    /// The message announced by [`Action::Pace`] may start now.
    pub fn on_paced(&mut self) {
        match (&self.state, self.paced.take()) {
            (State::Pacing, Some(p)) => self.open_transaction(p),
            _ => self.protocol_error(self.stage(), "pacing answer when none was asked"),
        }
    }

    /// The message announced by [`Action::Pace`] may not start on this connection:
    /// it and every later message end unattempted with `reply` (deferred, not from
    /// the server), and the session says QUIT.
    pub fn on_pace_refused(&mut self, reply: Reply) {
        if self.state != State::Pacing {
            return self.protocol_error(self.stage(), "pacing answer when none was asked");
        }
        self.paced = None;
        self.give_up(&reply, Stage::Mail, Outcome::Deferred, false);
    }

    /// Why a REQUIRETLS message may not go over this session, if it may not.
    fn requiretls_refusal(&self, caps: &Capabilities) -> Option<String> {
        let host = display_host(caps);
        if self.tls.is_none() {
            return Some(format!("{host} offers no TLS session"));
        }
        match &self.tls_verified {
            Some(Ok(())) => {}
            Some(Err(e)) => return Some(format!("certificate of {host} not verified: {e}")),
            None => return Some(format!("certificate of {host} not verified")),
        }
        if !caps.requiretls {
            return Some(format!("{host} does not offer REQUIRETLS"));
        }
        None
    }

    /// Local checks and command lines for message `m`; `None` when nothing is to be
    /// sent (every recipient already decided).
    fn prepare(&mut self, m: usize) -> Option<Prepared> {
        let msg = self.messages[m];
        let env = &msg.envelope;
        let caps = self.caps.clone().unwrap_or_default();
        if env.recipients.is_empty() {
            return None;
        }
        if unsafe_for_command(&env.mail.from) {
            let reply = local(553, (5, 1, 7), "sender address contains control characters");
            self.settle_message(m, &reply, Stage::Mail, Outcome::Bounced, false);
            return None;
        }
        if env.mail.body == BodyType::BinaryMime {
            // Cannot occur today (ingress does not offer BINARYMIME) and DATA cannot
            // carry binary content, so refuse rather than corrupt it.
            let reply = local(
                554,
                (5, 6, 3),
                "BINARYMIME content cannot be relayed (conversion required)",
            );
            self.settle_message(m, &reply, Stage::Mail, Outcome::Bounced, false);
            return None;
        }
        let size = wire_size(&msg.body);
        if let Some(limit) = caps.size.filter(|&l| l > 0 && size > l) {
            let reply = local(
                552,
                (5, 3, 4),
                format!(
                    "message size {size} exceeds the limit of {limit} octets announced by {}",
                    caps.hostname
                ),
            );
            self.settle_message(m, &reply, Stage::Mail, Outcome::Bounced, false);
            return None;
        }
        if env.mail.requiretls
            && let Some(why) = self.requiretls_refusal(&caps)
        {
            // RFC 8689 §4.2.1: never in plain text or to an unverified server;
            // the sender gets a DSN.
            let reply = local(
                550,
                (5, 7, 30),
                format!("REQUIRETLS support required: {why}"),
            );
            // RFC 8689 §4.2.1: another MX host may be suitable. When nothing was
            // tried on this connection and every message needs REQUIRETLS, the
            // host is given up like one whose TLS failed (deferred at STARTTLS,
            // so the caller tries the next host); the caller bounces with this
            // reply when no host is left ([`is_requiretls_refusal`]).
            if self.messages.iter().all(|x| x.envelope.mail.requiretls)
                && !self.states.iter().any(|s| s.attempted)
            {
                self.give_up(&reply, Stage::StartTls, Outcome::Deferred, false);
                return None;
            }
            self.settle_message(m, &reply, Stage::Mail, Outcome::Bounced, false);
            return None;
        }
        if env.mail.smtputf8 && !caps.smtputf8 && needs_smtputf8(msg) {
            let reply = local(
                554,
                (5, 6, 7),
                format!(
                    "SMTPUTF8 is required, but was not offered by {}",
                    caps.hostname
                ),
            );
            self.settle_message(m, &reply, Stage::Mail, Outcome::Bounced, false);
            return None;
        }

        // Appended in place: a format! per command line and parameter was ~600
        // instructions each.
        let mut mail = String::with_capacity(env.mail.from.len() + 64);
        mail.push_str("MAIL FROM:<");
        mail.push_str(&env.mail.from);
        mail.push('>');
        if caps.size.is_some() {
            let _ = write!(mail, " SIZE={size}");
        }
        if env.mail.body == BodyType::EightBitMime {
            if caps.eight_bit_mime {
                mail.push_str(" BODY=8BITMIME");
            } else {
                // What Postfix does by default: nearly every server passes 8-bit
                // octets through, while downgrading would mean rewriting MIME.
                self.states[m].warnings.push(format!(
                    "8BITMIME body sent as is to {}, which does not announce 8BITMIME",
                    display_host(&caps)
                ));
            }
        }
        if env.mail.smtputf8 && caps.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if env.mail.requiretls {
            mail.push_str(" REQUIRETLS");
        }
        let mut dsn_dropped = false;
        match (caps.dsn, env.mail.ret) {
            (true, Some(DsnRet::Full)) => mail.push_str(" RET=FULL"),
            (true, Some(DsnRet::Hdrs)) => mail.push_str(" RET=HDRS"),
            (false, Some(_)) => dsn_dropped = true,
            (_, None) => {}
        }
        if let Some(envid) = &env.mail.envid {
            if caps.dsn && safe_param(envid) {
                mail.push_str(&format!(" ENVID={envid}"));
            } else {
                dsn_dropped = true;
            }
        }
        mail.push_str("\r\n");

        let mut rcpts = Vec::with_capacity(env.recipients.len());
        for (i, r) in env.recipients.iter().enumerate() {
            if unsafe_for_command(&r.address) || r.address.is_empty() {
                let reply = local(
                    553,
                    (5, 1, 3),
                    "recipient address contains control characters",
                );
                self.settle(m, i, &reply, Stage::Rcpt, Outcome::Bounced, false);
                continue;
            }
            let mut line = String::with_capacity(r.address.len() + 16);
            line.push_str("RCPT TO:<");
            line.push_str(&r.address);
            line.push('>');
            if let Some(n) = r.notify.as_ref().and_then(notify_param) {
                if caps.dsn {
                    line.push_str(&format!(" NOTIFY={n}"));
                } else {
                    dsn_dropped = true;
                }
            }
            if let Some(orcpt) = &r.orcpt {
                if caps.dsn && safe_param(orcpt) {
                    line.push_str(&format!(" ORCPT={orcpt}"));
                } else {
                    dsn_dropped = true;
                }
            }
            line.push_str("\r\n");
            rcpts.push((i, line.into_bytes()));
        }
        self.states[m].dsn_unsupported = dsn_dropped;
        if rcpts.is_empty() {
            return None;
        }
        Some(Prepared {
            msg: m,
            mail: mail.into_bytes(),
            rcpts,
        })
    }

    fn begin(&mut self, p: Prepared) {
        self.states[p.msg].attempted = true;
        let pipelining = self.cfg.pipelining && self.caps.as_ref().is_some_and(|c| c.pipelining);
        let mut tx = Transaction {
            msg: p.msg,
            rcpts: p.rcpts,
            next_rcpt: 0,
            mail_ok: false,
            accepted: Vec::new(),
            pending: VecDeque::new(),
        };
        if pipelining {
            // RFC 2920 §3.1: MAIL, every RCPT and DATA go as one group (DATA last);
            // the replies come back in order.
            let mut group = p.mail;
            tx.pending.push_back(Expect::Mail);
            for (i, line) in &tx.rcpts {
                group.extend_from_slice(line);
                tx.pending.push_back(Expect::Rcpt(*i));
            }
            group.extend_from_slice(b"DATA\r\n");
            tx.pending.push_back(Expect::Data);
            tx.next_rcpt = tx.rcpts.len();
            self.send(group);
        } else {
            tx.pending.push_back(Expect::Mail);
            self.send(p.mail);
        }
        self.tx = Some(tx);
        self.expect(State::Transaction);
    }

    fn on_transaction_reply(&mut self, reply: Reply) {
        let Some(mut tx) = self.tx.take() else {
            return self.protocol_error(Stage::Mail, "reply outside a transaction");
        };
        let Some(expect) = tx.pending.pop_front() else {
            self.tx = Some(tx);
            return self.protocol_error(Stage::Mail, "reply nobody asked for");
        };
        let m = tx.msg;
        let class = reply.code / 100;
        match expect {
            Expect::Mail => {
                if class == 2 {
                    tx.mail_ok = true;
                    // The server now holds a transaction until it completes or RSET.
                    self.rset_needed = true;
                } else {
                    let outcome = Outcome::of_code(reply.code);
                    self.settle_message(m, &reply, Stage::Mail, outcome, true);
                }
            }
            Expect::Rcpt(i) => {
                // After a refused MAIL, RCPT replies (503 need MAIL) say nothing.
                if tx.mail_ok {
                    if class == 2 {
                        tx.accepted.push(i);
                    } else {
                        let outcome = Outcome::of_code(reply.code);
                        self.settle(m, i, &reply, Stage::Rcpt, outcome, true);
                    }
                }
            }
            Expect::Data => {
                if tx.mail_ok && !tx.accepted.is_empty() {
                    match class {
                        3 => {
                            let body = &self.messages[m].body;
                            self.actions.push_back(Action::Send(encode_data(body)));
                            tx.pending.push_back(Expect::Dot);
                        }
                        4 | 5 => {
                            let outcome = Outcome::of_code(reply.code);
                            self.settle_accepted(&tx, &reply, Stage::Data, outcome);
                        }
                        _ => {
                            self.tx = Some(tx);
                            return self.protocol_error(
                                Stage::Data,
                                &format!("unexpected reply to DATA: {reply}"),
                            );
                        }
                    }
                } else if class == 3 {
                    // A server that took DATA with no recipient gets an empty
                    // message, which it must refuse (RFC 2920 §3.1).
                    self.send(b".\r\n".to_vec());
                    tx.pending.push_back(Expect::DotDiscard);
                }
                // Otherwise the 503/554 refusing DATA is the expected consequence
                // of the refusals already recorded; it decides nothing.
            }
            Expect::Dot => {
                let outcome = Outcome::of_code(reply.code);
                self.settle_accepted(&tx, &reply, Stage::Message, outcome);
                // The reply after the content ends the transaction, whatever it is.
                self.rset_needed = false;
            }
            Expect::DotDiscard => {}
        }
        // Without PIPELINING, send the next command now.
        if tx.pending.is_empty() && tx.mail_ok && tx.next_rcpt < tx.rcpts.len() {
            let line = tx.rcpts[tx.next_rcpt].1.clone();
            tx.pending.push_back(Expect::Rcpt(tx.rcpts[tx.next_rcpt].0));
            tx.next_rcpt += 1;
            self.send(line);
        } else if tx.pending.is_empty()
            && tx.mail_ok
            && matches!(expect, Expect::Rcpt(_))
            && !tx.accepted.is_empty()
        {
            // The last RCPT reply is in (with PIPELINING, DATA went with the group).
            tx.pending.push_back(Expect::Data);
            self.send(b"DATA\r\n".to_vec());
        }
        if tx.pending.is_empty() {
            self.message_done(m);
        } else {
            self.tx = Some(tx);
            self.expect(State::Transaction);
        }
    }

    fn message_done(&mut self, m: usize) {
        // Defensive: a recipient the exchange left undecided (it cannot happen) is
        // deferred rather than forgotten.
        let reply = local(451, (4, 3, 0), "no reply decided this recipient");
        self.settle_message(m, &reply, Stage::Message, Outcome::Deferred, false);
        self.completed.push_back(m);
        self.tx = None;
        self.start_next_message();
    }

    fn quit(&mut self) {
        self.send(b"QUIT\r\n".to_vec());
        self.expect(State::Quit);
    }

    /// Settles every undecided recipient of every message, then QUIT.
    fn give_up(&mut self, reply: &Reply, stage: Stage, outcome: Outcome, remote: bool) {
        self.settle_all(reply, stage, outcome, remote);
        self.tx = None;
        self.after_rset = None;
        self.quit();
    }

    fn protocol_error(&mut self, stage: Stage, what: &str) {
        let reply = local(451, (4, 5, 0), format!("protocol error: {what}"));
        self.settle_all(&reply, stage, Outcome::Deferred, false);
        self.fail(format!("protocol error: {what}"));
    }

    fn fail(&mut self, reason: String) {
        self.tx = None;
        self.after_rset = None;
        self.paced = None;
        self.state = State::Finished;
        let outcomes = self.collect();
        self.actions.push_back(Action::Failed { reason, outcomes });
    }

    fn finish(&mut self) {
        self.state = State::Finished;
        let outcomes = self.collect();
        self.actions.push_back(Action::Done(outcomes));
    }

    fn collect(&mut self) -> Vec<MessageOutcome> {
        let reply = local(451, (4, 3, 0), "no reply decided this recipient");
        for m in 0..self.messages.len() {
            self.settle_message(m, &reply, Stage::Mail, Outcome::Deferred, false);
        }
        let states = std::mem::take(&mut self.states);
        states
            .into_iter()
            .zip(&self.messages)
            .map(|(s, msg)| MessageOutcome {
                id: msg.envelope.id.clone(),
                recipients: s.outcomes.into_iter().flatten().collect(),
                attempted: s.attempted,
                dsn_unsupported: s.dsn_unsupported,
                warnings: s.warnings,
            })
            .collect()
    }

    fn send(&mut self, bytes: Vec<u8>) {
        self.actions.push_back(Action::Send(bytes));
    }

    fn expect(&mut self, state: State) {
        self.state = state;
        self.actions.push_back(Action::ReadReply);
    }

    fn settle(
        &mut self,
        m: usize,
        i: usize,
        reply: &Reply,
        stage: Stage,
        result: Outcome,
        remote: bool,
    ) {
        let Some(slot) = self.states.get_mut(m).and_then(|s| s.outcomes.get_mut(i)) else {
            return;
        };
        if slot.is_none() {
            *slot = Some(RecipientOutcome {
                address: self.messages[m].envelope.recipients[i].address.clone(),
                result,
                reply: reply.clone(),
                stage,
                remote,
            });
        }
    }

    fn settle_message(
        &mut self,
        m: usize,
        reply: &Reply,
        stage: Stage,
        result: Outcome,
        remote: bool,
    ) {
        for i in 0..self.messages[m].envelope.recipients.len() {
            self.settle(m, i, reply, stage, result, remote);
        }
    }

    fn settle_accepted(&mut self, tx: &Transaction, reply: &Reply, stage: Stage, result: Outcome) {
        for &i in &tx.accepted {
            self.settle(tx.msg, i, reply, stage, result, true);
        }
    }

    /// Settles everything still open. Messages whose turn had not come are charged
    /// to the connection stage before any transaction, or to MAIL.
    fn settle_all(&mut self, reply: &Reply, stage: Stage, result: Outcome, remote: bool) {
        for m in 0..self.messages.len() {
            let stage = if self.states[m].attempted {
                stage
            } else {
                match stage {
                    Stage::Rcpt | Stage::Data | Stage::Message => Stage::Mail,
                    s => s,
                }
            };
            self.settle_message(m, reply, stage, result, remote);
        }
    }
}

fn display_host(caps: &Capabilities) -> &str {
    if caps.hostname.is_empty() {
        "the server"
    } else {
        &caps.hostname
    }
}

#[cfg(test)]
mod tests;
