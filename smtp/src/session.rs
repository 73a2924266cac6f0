//! The server side of one SMTP session as an IO-free state machine.
//!
//! The connection task reads lines and message octets, hands them to [`Session`],
//! and carries out the returned [`Step`]: write a reply, upgrade to TLS, read message
//! content, check credentials, or write the message to the queue. All protocol
//! decisions (ordering, limits, relay policy, extensions) are made here.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use super::auth::{AuthExchange, AuthStep, Mechanism};
use super::command::{self, Command, CommandError, Param, is_xtext, validate_mailbox};
use super::data::{DataDecoder, DataError};
use super::reply::Reply;
use super::sender::{SenderPolicy, SenderRefusal, from_addresses};
use crate::envelope::{
    BodyType, ClientInfo, DsnNotify, DsnRet, Envelope, MailParams, QueueId, QueuedMessage,
    Recipient, TlsInfo,
};
use crate::policy::{IngressFacts, IngressPolicy, Refusal};

/// RFC 5321 §4.5.3.1.4: command lines are at most 512 octets with CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 4954 §4: AUTH lines (and SASL responses) may be up to 12288 octets.
pub const MAX_AUTH_LINE: usize = 12288;

/// Limits and identity shared by all sessions of a listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: u32,
    pub max_messages: u32,
    pub add_missing_headers: bool,
    /// The queue store's backend (`redis`, `embedded`), named in the `451` a
    /// client gets when it fails, so that whoever reads the bounce or the client
    /// log knows which store to look at.
    pub queue_store: &'static str,
}

/// What the connection layer knows about this client.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    pub port: u16,
    pub listener: String,
    /// The client address is inside `relay_networks`.
    pub relay_allowed: bool,
    /// A certificate is loaded and the listener allows STARTTLS.
    pub starttls_available: bool,
    /// SMTP AUTH is configured (it is still only offered over TLS).
    pub auth_available: bool,
    /// Set from the start on implicit-TLS listeners.
    pub tls: Option<TlsInfo>,
}

/// What the connection layer must do next.
#[derive(Debug)]
pub enum Step {
    Reply(Reply),
    /// Send the reply, then close the connection.
    Close(Reply),
    /// Send the reply, discard any input already buffered, then do the TLS handshake
    /// and call [`Session::tls_started`].
    StartTls(Reply),
    /// Send the `354` reply, then feed message octets to [`Session::data_feed`] until
    /// it reports the end, then call [`Session::data_end`].
    ReadData(Reply),
    /// Read exactly `size` octets and feed them to [`Session::chunk_feed`], then call
    /// [`Session::chunk_end`] (RFC 3030: the chunk is read even when refused).
    ReadChunk {
        size: u64,
    },
    /// Verify these credentials and call [`Session::auth_result`].
    CheckCredentials {
        username: String,
        password: String,
    },
    /// Check the complete message against the ingress quotas (and charge them), then
    /// call [`Session::quota_result`].
    CheckQuota(Box<QueuedMessage>),
    /// Store the message, then call [`Session::enqueue_result`].
    Enqueue(Box<QueuedMessage>),
    /// Look the recipient up (suppression lists), then call
    /// [`Session::recipient_result`]. Only when [`Session::check_recipients`] is on.
    CheckRecipient(Box<RecipientCheck>),
}

/// What [`Step::CheckRecipient`] asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientCheck {
    /// Reverse-path; empty for the null sender.
    pub sender: String,
    pub auth_user: Option<String>,
    pub recipient: String,
}

/// The answer to [`Step::CheckRecipient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientVerdict {
    Accept,
    /// Refused with this reply (the reason labels the rejection metric).
    Refuse(Refusal),
    /// Answered `250`, but left out of the message: a transaction whose every
    /// recipient was dropped is answered `250` at the end of data and not queued.
    Drop,
}

/// Why a message could not be queued, as its client is told (always a `451`: the
/// client keeps the message and tries again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// The store refuses to grow (Redis at `maxmemory`, a full disk).
    Full,
    /// The store failed or could not be reached.
    Unavailable,
    /// No answer within `queue.write_timeout`; the message may still have been stored.
    Timeout,
    /// Stored, but the replicas did not confirm it within `wait_timeout`.
    Unreplicated,
}

impl StoreFailure {
    /// The `reason` label of metrics.
    pub fn reason(self) -> &'static str {
        match self {
            StoreFailure::Full => "full",
            StoreFailure::Unavailable => "unavailable",
            StoreFailure::Timeout => "timeout",
            StoreFailure::Unreplicated => "unreplicated",
        }
    }
}

#[derive(Debug, Default)]
struct Transaction {
    mail: Option<MailParams>,
    rcpts: Vec<Recipient>,
    /// BDAT in progress: the content so far, and the reply owed if it is refused.
    bdat: Option<DataDecoder>,
    bdat_refusal: Option<Reply>,
    /// Recipients answered `250` but dropped (suppressed with `on_suppressed: drop`).
    dropped: usize,
    /// The recipient waiting for [`Session::recipient_result`].
    checking: Option<Recipient>,
}

#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    peer: Peer,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    auth: Option<AuthExchange>,
    tx: Transaction,
    data: Option<DataDecoder>,
    errors: u32,
    messages: u32,
    last_verb: &'static str,
    bdat_last: bool,
    /// Why the last step refused something, for the rejected-by-reason metric.
    rejection: Option<&'static str>,
    /// Ingress quotas: cheap checks at MAIL and RCPT, and whether a complete message
    /// needs the full check before it is queued.
    quota: Option<Arc<dyn IngressPolicy>>,
    /// Which senders this client may use.
    senders: Option<Arc<SenderPolicy>>,
    /// The last sender refused, for the connection layer's log and metric.
    sender_refusal: Option<SenderRefusal>,
    /// Ask the connection layer about each recipient ([`Step::CheckRecipient`]).
    check_recipients: bool,
}

fn r(code: u16, esc: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::status(code, esc, text)
}

impl Session {
    pub fn new(cfg: SessionConfig, peer: Peer) -> Self {
        Session {
            cfg,
            peer,
            helo: None,
            esmtp: false,
            auth_user: None,
            auth: None,
            tx: Transaction::default(),
            data: None,
            errors: 0,
            messages: 0,
            last_verb: "NONE",
            bdat_last: false,
            rejection: None,
            quota: None,
            senders: None,
            sender_refusal: None,
            check_recipients: false,
        }
    }

    /// Has every recipient that passed the session's own checks looked up by the
    /// connection layer before it is accepted ([`Step::CheckRecipient`]).
    pub fn check_recipients(&mut self, on: bool) {
        self.check_recipients = on;
    }

    /// The answer to [`Step::CheckRecipient`].
    pub fn recipient_result(&mut self, verdict: RecipientVerdict) -> Step {
        let Some(rcpt) = self.tx.checking.take() else {
            return Step::Reply(r(503, (5, 5, 1), "Error: bad sequence of commands"));
        };
        match verdict {
            RecipientVerdict::Accept => {
                self.tx.rcpts.push(rcpt);
                Step::Reply(r(250, (2, 1, 5), "Ok"))
            }
            RecipientVerdict::Refuse(refusal) => self.quota_refusal(refusal),
            RecipientVerdict::Drop => {
                self.tx.dropped += 1;
                Step::Reply(r(250, (2, 1, 5), "Ok"))
            }
        }
    }

    /// Binds the session's users and relay-network client to their senders.
    pub fn set_sender_policy(&mut self, policy: Arc<SenderPolicy>) {
        self.senders = Some(policy);
    }

    /// The sender refused by the last step, if one was (taken once).
    pub fn take_sender_refusal(&mut self) -> Option<SenderRefusal> {
        self.sender_refusal.take()
    }

    /// Checks `sender` against the sender binding; the refusal reply if it fails.
    fn sender_check(&mut self, sender: &str, stage: &'static str) -> Option<Reply> {
        let policy = self.senders.as_ref()?;
        let relay_client = self.peer.relay_allowed.then_some(self.peer.ip);
        let refusal = policy.check(self.auth_user.as_deref(), relay_client, sender, stage)?;
        let what = if stage == "from_header" {
            "From: header address"
        } else {
            "Sender address"
        };
        let reply = r(
            550,
            (5, 7, 1),
            format!(
                "{what} <{sender}> not allowed for {} (rule {})",
                refusal.subject, refusal.rule
            ),
        );
        self.rejection = Some("sender_not_allowed");
        self.sender_refusal = Some(refusal);
        Some(reply)
    }

    /// Puts the session under ingress quotas.
    pub fn set_ingress_policy(&mut self, policy: Arc<dyn IngressPolicy>) {
        self.quota = Some(policy);
    }

    fn facts<'a>(&'a self, sender: &'a str) -> IngressFacts<'a> {
        IngressFacts {
            sender,
            auth_user: self.auth_user.as_deref(),
            client_ip: self.peer.ip,
        }
    }

    /// A quota refusal: a temporary (or size) answer, not a protocol error.
    fn quota_refusal(&mut self, r: Refusal) -> Step {
        self.rejection = Some(r.reason);
        Step::Reply(r.reply)
    }

    pub fn greeting(&self) -> Reply {
        // Concatenated, not `format!`ted: once per session, and most sessions carry
        // one message.
        Reply::new(
            220,
            None,
            [self.cfg.hostname.as_str(), " ESMTP mailrelay"].concat(),
        )
    }

    /// Verb of the last command line handled, for metrics.
    pub fn last_verb(&self) -> &'static str {
        self.last_verb
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// A mail transaction or SASL exchange is under way (shutdown waits for it).
    pub fn in_transaction(&self) -> bool {
        self.tx.mail.is_some() || self.tx.bdat.is_some() || self.auth.is_some()
    }

    /// A BDAT transaction has read at least one chunk and not ended yet.
    pub fn bdat_in_progress(&self) -> bool {
        self.tx.bdat.is_some()
    }

    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// The longest line the reader should accept next: larger while a SASL exchange
    /// is under way or for AUTH with an initial response.
    pub fn max_line(&self) -> usize {
        MAX_AUTH_LINE
    }

    /// The reason the last step refused a command or message, if it did (taken once).
    pub fn take_rejection(&mut self) -> Option<&'static str> {
        self.rejection.take()
    }

    fn error(&mut self, reply: Reply) -> Step {
        self.errors += 1;
        self.rejection = Some(classify(&reply));
        if self.errors >= self.cfg.max_errors {
            self.rejection = Some("too_many_errors");
            return Step::Close(r(
                421,
                (4, 7, 0),
                format!("{} Error: too many errors", self.cfg.hostname),
            ));
        }
        Step::Reply(reply)
    }

    /// The reader found a line longer than [`Session::max_line`] and discarded it.
    pub fn line_too_long(&mut self) -> Step {
        self.last_verb = "UNKNOWN";
        self.auth = None;
        self.error(r(500, (5, 5, 2), "Error: line too long"))
    }

    /// Handles one line as read, including its line terminator.
    pub fn on_line(&mut self, raw: &[u8]) -> Step {
        let line = match raw.strip_suffix(b"\r\n") {
            Some(l) if !l.contains(&b'\r') && !l.contains(&b'\n') => l,
            Some(_) => {
                self.last_verb = "UNKNOWN";
                self.auth = None;
                return self.error(r(
                    500,
                    (5, 5, 2),
                    "Error: bare <CR> received; lines must end with <CR><LF>",
                ));
            }
            None => {
                self.last_verb = "UNKNOWN";
                self.auth = None;
                return self.error(r(
                    500,
                    (5, 5, 2),
                    "Error: bare <LF> received; lines must end with <CR><LF>",
                ));
            }
        };
        if let Some(ex) = self.auth.take() {
            self.last_verb = "AUTH";
            return self.auth_response(ex, line);
        }
        let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
        if raw.len() > MAX_COMMAND_LINE && !is_auth {
            self.last_verb = "UNKNOWN";
            return self.error(r(500, (5, 5, 2), "Error: line too long"));
        }
        let Ok(text) = std::str::from_utf8(line) else {
            self.last_verb = "UNKNOWN";
            return self.error(r(500, (5, 5, 2), "Error: invalid UTF-8 in command"));
        };
        if text.contains('\0') {
            self.last_verb = "UNKNOWN";
            return self.error(r(500, (5, 5, 2), "Error: NUL in command"));
        }
        let cmd = match command::parse(text) {
            Ok(c) => c,
            Err(e) => {
                self.last_verb = match e {
                    CommandError::Unrecognized => "UNKNOWN",
                    CommandError::Syntax(_) => {
                        text.split(' ').next().map(known_verb).unwrap_or("UNKNOWN")
                    }
                };
                // A malformed BDAT leaves us unable to find the next command.
                if self.last_verb == "BDAT" {
                    return Step::Close(r(554, (5, 5, 4), "Error: malformed BDAT, closing"));
                }
                return self.error(e.reply());
            }
        };
        self.last_verb = cmd.verb();
        self.command(cmd)
    }

    fn command(&mut self, cmd: Command) -> Step {
        if self.tx.bdat.is_some()
            && !matches!(
                cmd,
                Command::Bdat { .. } | Command::Rset | Command::Quit | Command::Noop
            )
        {
            self.tx = Transaction::default();
            return self.error(r(
                503,
                (5, 5, 1),
                "Error: only BDAT, RSET, NOOP or QUIT may follow BDAT",
            ));
        }
        match cmd {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail { path, params } => self.mail(path, params),
            Command::Rcpt { path, params } => self.rcpt(path, params),
            Command::Data => self.data_cmd(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.tx = Transaction::default();
                Step::Reply(r(250, (2, 0, 0), "Ok"))
            }
            Command::Noop => Step::Reply(r(250, (2, 0, 0), "Ok")),
            Command::Quit => Step::Close(r(221, (2, 0, 0), "Bye")),
            Command::Help => Step::Reply(r(
                214,
                (2, 0, 0),
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS AUTH; see RFC 5321",
            )),
            // Address verification would let anyone probe which mailboxes exist.
            Command::Vrfy => Step::Reply(r(
                252,
                (2, 5, 2),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => Step::Reply(r(502, (5, 5, 1), "EXPN not available")),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth_cmd(&mechanism, initial),
            Command::ForeignProtocol => {
                Step::Close(r(554, (5, 7, 0), "Not an SMTP client; closing"))
            }
        }
    }

    fn hello(&mut self, name: String, esmtp: bool) -> Step {
        self.tx = Transaction::default();
        self.helo = Some(name);
        self.esmtp = esmtp;
        if !esmtp {
            return Step::Reply(Reply::new(250, None, self.cfg.hostname.clone()));
        }
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
            "CHUNKING".into(),
        ];
        if self.peer.tls.is_none() && self.peer.starttls_available {
            lines.push("STARTTLS".into());
        }
        // RFC 8689 §4.1: offered (and accepted) only inside TLS.
        if self.peer.tls.is_some() {
            lines.push("REQUIRETLS".into());
        }
        if self.peer.tls.is_some() && self.peer.auth_available && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Step::Reply(Reply::multiline(250, lines))
    }

    fn mail(&mut self, path: String, params: Vec<Param>) -> Step {
        if self.helo.is_none() {
            return self.error(r(503, (5, 5, 1), "Error: send HELO/EHLO first"));
        }
        if self.tx.mail.is_some() {
            return self.error(r(503, (5, 5, 1), "Error: nested MAIL command"));
        }
        if self.messages >= self.cfg.max_messages {
            self.rejection = Some("too_many_messages");
            return Step::Close(r(
                421,
                (4, 7, 0),
                format!(
                    "{} Error: too many messages in one session",
                    self.cfg.hostname
                ),
            ));
        }
        let mut mail = MailParams {
            from: path,
            ..MailParams::default()
        };
        if !params.is_empty() && !self.esmtp {
            return self.error(r(555, (5, 5, 4), "Error: parameters need EHLO"));
        }
        for p in params {
            let v = p.value.as_deref();
            match (p.keyword.as_str(), v) {
                ("SIZE", Some(v))
                    if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    let size: u64 = v.parse().unwrap_or(u64::MAX);
                    if size > self.cfg.max_message_size {
                        self.rejection = Some("message_too_big");
                        return Step::Reply(r(
                            552,
                            (5, 3, 4),
                            "Error: message size exceeds fixed maximum message size",
                        ));
                    }
                    mail.size = Some(size);
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {
                    mail.body = BodyType::SevenBit
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                    mail.body = BodyType::EightBitMime
                }
                ("SMTPUTF8", None) => mail.smtputf8 = true,
                ("REQUIRETLS", None) if self.peer.tls.is_none() => {
                    return self.error(r(
                        530,
                        (5, 7, 10),
                        "REQUIRETLS needed: the MAIL parameter REQUIRETLS needs a TLS session",
                    ));
                }
                ("REQUIRETLS", None) => mail.requiretls = true,
                ("RET", Some(v)) if v.eq_ignore_ascii_case("FULL") => mail.ret = Some(DsnRet::Full),
                ("RET", Some(v)) if v.eq_ignore_ascii_case("HDRS") => mail.ret = Some(DsnRet::Hdrs),
                ("ENVID", Some(v)) if v.len() <= 100 && is_xtext(v) => {
                    mail.envid = Some(v.to_owned())
                }
                // RFC 4954 §5: the AUTH parameter is accepted; we do not trust it.
                ("AUTH", Some(v)) if is_xtext(v) || v == "<>" => {}
                (k, _) => {
                    return self.error(r(
                        555,
                        (5, 5, 4),
                        format!("Error: unsupported or malformed parameter {k}"),
                    ));
                }
            }
        }
        if let (false, Err(reply)) = (
            mail.from.is_empty(),
            validate_mailbox(&mail.from, mail.smtputf8),
        ) {
            return self.error(reply);
        }
        if let Some(reply) = self.sender_check(&mail.from, "mail_from") {
            return Step::Reply(reply);
        }
        if let Some(policy) = &self.quota
            && let Some(refusal) = policy.at_mail(&self.facts(&mail.from), mail.size)
        {
            return self.quota_refusal(refusal);
        }
        self.tx.mail = Some(mail);
        Step::Reply(r(250, (2, 1, 0), "Ok"))
    }

    fn rcpt(&mut self, path: String, params: Vec<Param>) -> Step {
        let Some(mail) = &self.tx.mail else {
            return self.error(r(503, (5, 5, 1), "Error: need MAIL command"));
        };
        let smtputf8 = mail.smtputf8;
        if path.is_empty() {
            return self.error(r(501, (5, 1, 3), "Error: empty recipient"));
        }
        // RFC 5321 §4.5.1: `<Postmaster>` without a domain must be accepted. It means
        // this relay's own postmaster, `postmaster@<hostname>`, delivered like any
        // other mail to that domain (MX or relayhost). The same address is the one
        // recipient a client outside `relay_networks` may reach: it is a fixed
        // mailbox, so this opens no relaying to arbitrary destinations.
        let path = if path.eq_ignore_ascii_case("postmaster") {
            self.postmaster()
        } else {
            path
        };
        if let Err(reply) = validate_mailbox(&path, smtputf8) {
            return self.error(reply);
        }
        // `postmaster` is a case-insensitive local name (§4.5.1).
        let to_postmaster = path.eq_ignore_ascii_case(&self.postmaster());
        let path = if to_postmaster {
            self.postmaster()
        } else {
            path
        };
        // Every other recipient is remote for a relay, so every RCPT is a relay request.
        if !self.peer.relay_allowed && self.auth_user.is_none() && !to_postmaster {
            return self.error(r(554, (5, 7, 1), format!("<{path}>: Relay access denied")));
        }
        let mut rcpt = Recipient {
            address: path,
            notify: None,
            orcpt: None,
        };
        for p in params {
            match (p.keyword.as_str(), p.value.as_deref()) {
                ("NOTIFY", Some(v)) if self.esmtp => match parse_notify(v) {
                    Some(n) => rcpt.notify = Some(n),
                    None => return self.error(r(501, (5, 5, 4), "Error: bad NOTIFY parameter")),
                },
                ("ORCPT", Some(v)) if self.esmtp && v.len() <= 500 => match v.split_once(';') {
                    Some((t, x))
                        if !t.is_empty()
                            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                            && (is_xtext(x)
                                || (smtputf8
                                    && t.eq_ignore_ascii_case("utf-8")
                                    && is_utf8_addr_text(x))) =>
                    {
                        rcpt.orcpt = Some(v.to_owned())
                    }
                    _ => return self.error(r(501, (5, 5, 4), "Error: bad ORCPT parameter")),
                },
                (k, _) => {
                    return self.error(r(
                        555,
                        (5, 5, 4),
                        format!("Error: unsupported or malformed parameter {k}"),
                    ));
                }
            }
        }
        if self
            .tx
            .rcpts
            .iter()
            .any(|x| same_address(&x.address, &rcpt.address))
        {
            return Step::Reply(r(250, (2, 1, 5), "Ok (duplicate recipient)"));
        }
        if self.tx.rcpts.len() >= self.cfg.max_recipients {
            self.rejection = Some("too_many_recipients");
            return Step::Reply(r(452, (4, 5, 3), "Error: too many recipients"));
        }
        if let Some(policy) = &self.quota {
            let sender = self.tx.mail.as_ref().map_or("", |m| m.from.as_str());
            let accepted: Vec<&str> = self.tx.rcpts.iter().map(|x| x.address.as_str()).collect();
            if let Some(refusal) = policy.at_rcpt(&self.facts(sender), &accepted, &rcpt.address) {
                return self.quota_refusal(refusal);
            }
        }
        if self.check_recipients {
            let check = RecipientCheck {
                sender: self
                    .tx
                    .mail
                    .as_ref()
                    .map_or_else(String::new, |m| m.from.clone()),
                auth_user: self.auth_user.clone(),
                recipient: rcpt.address.clone(),
            };
            self.tx.checking = Some(rcpt);
            return Step::CheckRecipient(Box::new(check));
        }
        self.tx.rcpts.push(rcpt);
        Step::Reply(r(250, (2, 1, 5), "Ok"))
    }

    /// Where `RCPT TO:<Postmaster>` goes.
    fn postmaster(&self) -> String {
        format!("postmaster@{}", self.cfg.hostname)
    }

    fn data_cmd(&mut self) -> Step {
        if self.tx.mail.is_none() {
            return self.error(r(503, (5, 5, 1), "Error: need MAIL command"));
        }
        if self.tx.rcpts.is_empty() && self.tx.dropped == 0 {
            return self.error(r(554, (5, 5, 1), "Error: no valid recipients"));
        }
        self.data = Some(DataDecoder::for_data(
            self.cfg.max_line_length,
            self.cfg.max_message_size,
        ));
        Step::ReadData(Reply::new(354, None, "End data with <CR><LF>.<CR><LF>"))
    }

    /// Feeds message octets after `354`; returns `Some(consumed)` at the end of data.
    pub fn data_feed(&mut self, input: &[u8]) -> Option<usize> {
        self.data.as_mut().and_then(|d| d.feed(input))
    }

    /// Content octets received so far in the current DATA.
    pub fn data_size(&self) -> u64 {
        self.data.as_ref().map_or(0, DataDecoder::size)
    }

    /// Called after the end of data was seen.
    pub fn data_end(&mut self, id: QueueId, now: OffsetDateTime) -> Step {
        let decoder = self.data.take().expect("data_end without DATA");
        self.finish_content(decoder, id, now)
    }

    fn finish_content(&mut self, decoder: DataDecoder, id: QueueId, now: OffsetDateTime) -> Step {
        match decoder.into_result() {
            Ok(_) if self.tx.rcpts.is_empty() => {
                // Every recipient was dropped: nothing to queue.
                self.tx = Transaction::default();
                self.messages += 1;
                Step::Reply(r(250, (2, 0, 0), "Ok: no recipient left to deliver to"))
            }
            Ok(content) => {
                if self.senders.as_ref().is_some_and(|p| p.check_from_header()) {
                    for addr in from_addresses(&content) {
                        if let Some(reply) = self.sender_check(&addr, "from_header") {
                            // Nothing is queued: the transaction ends here.
                            self.tx = Transaction::default();
                            return Step::Reply(reply);
                        }
                    }
                }
                let message = Box::new(self.build_message(content, id, now));
                if self
                    .quota
                    .as_ref()
                    .is_some_and(|p| p.check_before_queueing())
                {
                    Step::CheckQuota(message)
                } else {
                    Step::Enqueue(message)
                }
            }
            Err(e) => {
                self.tx = Transaction::default();
                let reply = refusal(e, self.cfg.max_line_length);
                self.rejection = Some(e.reason());
                match e {
                    // Smuggling attempts and broken clients count towards the error limit.
                    DataError::BareLf | DataError::BareCr | DataError::Nul => {
                        let step = self.error(reply);
                        // `error` labels by reply; keep the precise reason unless the
                        // session is being closed for too many errors.
                        if self.rejection != Some("too_many_errors") {
                            self.rejection = Some(e.reason());
                        }
                        step
                    }
                    _ => Step::Reply(reply),
                }
            }
        }
    }

    fn bdat(&mut self, size: u64, last: bool) -> Step {
        if self.tx.bdat.is_none() {
            let refusal = if self.tx.mail.is_none() {
                Some(r(503, (5, 5, 1), "Error: need MAIL command"))
            } else if self.tx.rcpts.is_empty() && self.tx.dropped == 0 {
                Some(r(554, (5, 5, 1), "Error: no valid recipients"))
            } else {
                None
            };
            self.tx.bdat = Some(DataDecoder::for_bdat(
                self.cfg.max_line_length,
                self.cfg.max_message_size,
            ));
            self.tx.bdat_refusal = refusal;
        }
        let so_far = self.tx.bdat.as_ref().map_or(0, DataDecoder::size);
        // Reading a huge chunk only to throw it away would tie the session up.
        if so_far.saturating_add(size) > self.cfg.max_message_size {
            self.rejection = Some("message_too_big");
            self.tx = Transaction::default();
            return Step::Close(r(
                552,
                (5, 3, 4),
                "Error: message size exceeds fixed maximum message size",
            ));
        }
        self.bdat_last = last;
        Step::ReadChunk { size }
    }

    pub fn chunk_feed(&mut self, octets: &[u8]) {
        if let Some(d) = self.tx.bdat.as_mut() {
            d.feed(octets);
        }
    }

    /// Called once all octets of the current chunk were fed.
    pub fn chunk_end(&mut self, id: QueueId, now: OffsetDateTime) -> Step {
        if let Some(refusal) = self.tx.bdat_refusal.take() {
            self.tx = Transaction::default();
            return self.error(refusal);
        }
        if !self.bdat_last {
            let size = self.tx.bdat.as_ref().map_or(0, DataDecoder::size);
            return Step::Reply(r(250, (2, 0, 0), format!("{size} octets received")));
        }
        let mut decoder = self.tx.bdat.take().expect("chunk_end without BDAT");
        decoder.finish_bdat();
        self.finish_content(decoder, id, now)
    }

    /// The quotas' answer to [`Step::CheckQuota`]: queue the message, or refuse it
    /// (the transaction is over either way).
    pub fn quota_result(&mut self, message: Box<QueuedMessage>, refusal: Option<Refusal>) -> Step {
        match refusal {
            None => Step::Enqueue(message),
            Some(r) => self.quota_refusal(r),
        }
    }

    /// The queue's answer to [`Step::Enqueue`].
    pub fn enqueue_result(&mut self, id: &QueueId, result: Result<(), StoreFailure>) -> Reply {
        self.tx = Transaction::default();
        match result {
            Ok(()) => {
                self.messages += 1;
                r(250, (2, 0, 0), ["Ok: queued as ", id.as_str()].concat())
            }
            // RFC 3463 X.3.1 "mail system full": a client (or its operator) reading
            // the bounce of a long-deferred message learns the relay is out of
            // space, not that it is broken.
            Err(StoreFailure::Full) => r(
                451,
                (4, 3, 1),
                format!(
                    "Error: queue store ({}) full, try again later",
                    self.cfg.queue_store
                ),
            ),
            Err(StoreFailure::Unavailable) => r(
                451,
                (4, 3, 0),
                format!(
                    "Error: queue store ({}) unavailable, try again later",
                    self.cfg.queue_store
                ),
            ),
            Err(StoreFailure::Timeout) => r(
                451,
                (4, 3, 0),
                format!(
                    "Error: queue store ({}) did not answer in time, try again later",
                    self.cfg.queue_store
                ),
            ),
            Err(StoreFailure::Unreplicated) => r(
                451,
                (4, 3, 0),
                format!(
                    "Error: queue store ({}) replicas did not confirm the write in time, try again later",
                    self.cfg.queue_store
                ),
            ),
        }
    }

    fn starttls(&mut self) -> Step {
        if self.peer.tls.is_some() {
            return self.error(r(503, (5, 5, 1), "Error: TLS already active"));
        }
        if !self.peer.starttls_available {
            return self.error(r(502, (5, 5, 1), "Error: command not implemented"));
        }
        if self.tx.mail.is_some() {
            return self.error(r(
                503,
                (5, 5, 1),
                "Error: STARTTLS not allowed during a mail transaction",
            ));
        }
        Step::StartTls(Reply::new(
            220,
            Some(super::reply::Enhanced(2, 0, 0)),
            "Ready to start TLS",
        ))
    }

    /// The TLS handshake after STARTTLS succeeded: RFC 3207 §4.2 says forget
    /// everything learned before it.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.peer.tls = Some(info);
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.auth = None;
        self.tx = Transaction::default();
    }

    fn auth_cmd(&mut self, mechanism: &str, initial: Option<String>) -> Step {
        if !self.peer.auth_available {
            return self.error(r(502, (5, 5, 1), "Error: authentication not enabled"));
        }
        if self.peer.tls.is_none() {
            return self.error(r(
                538,
                (5, 7, 11),
                "Error: encryption required for requested authentication mechanism",
            ));
        }
        if self.helo.is_none() || !self.esmtp {
            return self.error(r(503, (5, 5, 1), "Error: send EHLO first"));
        }
        if self.auth_user.is_some() {
            return self.error(r(503, (5, 5, 1), "Error: already authenticated"));
        }
        if self.tx.mail.is_some() {
            return self.error(r(
                503,
                (5, 5, 1),
                "Error: AUTH not allowed during a mail transaction",
            ));
        }
        let Some(mech) = Mechanism::parse(mechanism) else {
            return self.error(r(504, (5, 5, 4), "Error: unrecognized authentication type"));
        };
        let (ex, step) = AuthExchange::start(mech, initial.as_deref());
        self.auth_step(ex, step)
    }

    fn auth_response(&mut self, ex: AuthExchange, line: &[u8]) -> Step {
        let text = std::str::from_utf8(line).unwrap_or("!");
        let (ex, step) = ex.respond(text);
        self.auth_step(ex, step)
    }

    fn auth_step(&mut self, ex: Option<AuthExchange>, step: AuthStep) -> Step {
        match step {
            AuthStep::Challenge(c) => {
                self.auth = ex;
                Step::Reply(Reply::new(334, None, c))
            }
            AuthStep::Credentials { username, password } => {
                Step::CheckCredentials { username, password }
            }
            AuthStep::Cancelled => self.error(r(501, (5, 0, 0), "Authentication cancelled")),
            AuthStep::Malformed => self.error(r(501, (5, 5, 2), "Error: cannot decode response")),
        }
    }

    /// The answer to [`Step::CheckCredentials`].
    pub fn auth_result(&mut self, username: String, ok: bool) -> Step {
        if ok {
            self.auth_user = Some(username);
            Step::Reply(r(235, (2, 7, 0), "Authentication successful"))
        } else {
            self.error(r(
                535,
                (5, 7, 8),
                "Error: authentication credentials invalid",
            ))
        }
    }

    /// The answer to [`Step::CheckCredentials`] when the attempt was refused
    /// unchecked (a lockout, or the failure counters out of reach): one reply for
    /// every case, so it tells nothing about the user or the password.
    pub fn auth_unavailable(&mut self) -> Step {
        self.error(r(
            454,
            (4, 7, 0),
            "Temporary authentication failure, try again later",
        ))
    }

    fn protocol(&self) -> &'static str {
        let utf8 = self.tx.mail.as_ref().is_some_and(|m| m.smtputf8);
        match (
            self.esmtp,
            utf8,
            self.peer.tls.is_some(),
            self.auth_user.is_some(),
        ) {
            (false, _, _, _) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }

    fn build_message(
        &mut self,
        content: Vec<u8>,
        id: QueueId,
        now: OffsetDateTime,
    ) -> QueuedMessage {
        let date = now.format(&Rfc2822).unwrap_or_default();
        let helo = self.helo.clone().unwrap_or_default();
        // One buffer written in place (no temporary String per part), with plain
        // appends: going through `fmt` for the six parts of the header (and the
        // IPv4 address's own Display) was ~2,300 instructions per message.
        let mut head = String::with_capacity(256);
        head.push_str("Received: from ");
        head.push_str(&helo);
        match self.peer.ip {
            IpAddr::V4(v4) => {
                head.push_str(" ([");
                push_ipv4(&mut head, v4);
                head.push_str("])\r\n");
            }
            IpAddr::V6(v6) => {
                let _ = write!(head, " ([IPv6:{v6}])\r\n");
            }
        }
        if let Some(tls) = &self.peer.tls {
            let _ = write!(
                head,
                "\t(using {} with cipher {})\r\n",
                tls.version, tls.cipher
            );
        }
        head.push_str("\tby ");
        head.push_str(&self.cfg.hostname);
        head.push_str(" (mailrelay) with ");
        head.push_str(self.protocol());
        head.push_str(" id ");
        head.push_str(id.as_str());
        if let [only] = self.tx.rcpts.as_slice() {
            head.push_str("\r\n\tfor <");
            head.push_str(&only.address);
            head.push('>');
        }
        head.push_str("; ");
        head.push_str(&date);
        head.push_str("\r\n");
        if self.cfg.add_missing_headers {
            let (has_date, has_msgid) = scan_headers(&content);
            if !has_date {
                head.push_str("Date: ");
                head.push_str(&date);
                head.push_str("\r\n");
            }
            if !has_msgid {
                head.push_str("Message-ID: <");
                head.push_str(id.as_str());
                head.push('@');
                head.push_str(&self.cfg.hostname);
                head.push_str(">\r\n");
            }
        }
        let mut body = Vec::with_capacity(head.len() + content.len());
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(&content);
        let tx = std::mem::take(&mut self.tx);
        QueuedMessage {
            envelope: Envelope {
                id,
                mail: tx.mail.unwrap_or_default(),
                recipients: tx.rcpts,
                client: ClientInfo {
                    ip: self.peer.ip,
                    port: self.peer.port,
                    helo,
                    auth_user: self.auth_user.clone(),
                    tls: self.peer.tls.clone(),
                    listener: self.peer.listener.clone(),
                },
                received_at_ms: (now.unix_timestamp_nanos() / 1_000_000) as u64,
                received_by: self.cfg.hostname.clone(),
            },
            body,
        }
    }
}

/// The text of `ip` as its Display writes it; IPv4 (nearly every next hop and
/// client) without `fmt`, which costs ~1,300 instructions per address.
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            push_ipv4(&mut s, v4);
            s
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// `a.b.c.d`, as `Ipv4Addr`'s Display writes it.
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if o >= 100 {
            out.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            out.push(char::from(b'0' + o / 10 % 10));
        }
        out.push(char::from(b'0' + o % 10));
    }
}

fn known_verb(v: &str) -> &'static str {
    match command::parse(&v.to_ascii_uppercase()) {
        Ok(c) => c.verb(),
        Err(CommandError::Syntax(_)) => {
            const VERBS: [&str; 14] = [
                "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP",
                "VRFY", "EXPN", "STARTTLS", "AUTH",
            ];
            VERBS
                .into_iter()
                .find(|x| x.eq_ignore_ascii_case(v))
                .unwrap_or("UNKNOWN")
        }
        Err(CommandError::Unrecognized) => "UNKNOWN",
    }
}

/// A bounded set of metric labels for refusals counted as client errors.
fn classify(reply: &Reply) -> &'static str {
    use super::reply::Enhanced;
    let text = reply.lines.first().map(String::as_str).unwrap_or("");
    match (reply.code, reply.enhanced) {
        (_, Some(Enhanced(5, 7, 1))) => "relay_denied",
        (_, Some(Enhanced(5, 7, 8))) => "auth_failed",
        (_, Some(Enhanced(5, 7, 11))) => "auth_requires_tls",
        (454, Some(Enhanced(4, 7, 0))) => "auth_locked",
        (550, _) if text.contains("bare <LF>") => "bare_lf",
        (550, _) if text.contains("bare <CR>") => "bare_cr",
        (500, _) if text.contains("bare <") => "bare_line_ending",
        (500, _) if text.contains("line too long") => "line_too_long",
        (500, _) if text.contains("not recognized") => "unknown_command",
        (503, _) => "bad_sequence",
        (501 | 504 | 555 | 500 | 553, _) => "syntax",
        _ => "protocol_error",
    }
}

fn refusal(e: DataError, max_line: usize) -> Reply {
    match e {
        DataError::BareLf => r(
            550,
            (5, 5, 2),
            "Error: bare <LF> received; message refused (lines must end with <CR><LF>)",
        ),
        DataError::BareCr => r(
            550,
            (5, 5, 2),
            "Error: bare <CR> received; message refused (lines must end with <CR><LF>)",
        ),
        DataError::LineTooLong => r(
            550,
            (5, 5, 2),
            format!("Error: message line longer than {max_line} octets"),
        ),
        DataError::Nul => r(
            550,
            (5, 6, 0),
            "Error: message contains NUL octets; refused (BINARYMIME is not supported)",
        ),
        DataError::TooBig => r(
            552,
            (5, 3, 4),
            "Error: message size exceeds fixed maximum message size",
        ),
    }
}

fn parse_notify(v: &str) -> Option<DsnNotify> {
    let mut n = DsnNotify::default();
    for item in v.split(',') {
        match item.to_ascii_uppercase().as_str() {
            "NEVER" => n.never = true,
            "SUCCESS" => n.success = true,
            "FAILURE" => n.failure = true,
            "DELAY" => n.delay = true,
            _ => return None,
        }
    }
    // RFC 3461 §4.1: NEVER cannot be combined with anything else.
    if n.never && (n.success || n.failure || n.delay) {
        return None;
    }
    Some(n)
}

/// RFC 6533 §3: in an SMTPUTF8 transaction an ORCPT of type `utf-8` may carry the
/// address as UTF-8 text (no controls, spaces, `+` or `=`; those are `\x{..}` escaped).
fn is_utf8_addr_text(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && c != '+' && c != '=')
}

/// Addresses compare case-sensitively in the local part, insensitively in the domain.
fn same_address(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

/// Whether the header section has `Date:` and `Message-ID:` fields.
fn scan_headers(content: &[u8]) -> (bool, bool) {
    let (mut date, mut msgid) = (false, false);
    for line in content.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            // Not a header at all: the message has no header section to speak of.
            break;
        };
        let name = line[..colon].trim_ascii_end();
        date |= name.eq_ignore_ascii_case(b"Date");
        msgid |= name.eq_ignore_ascii_case(b"Message-ID");
    }
    (date, msgid)
}

#[cfg(test)]
mod tests;
