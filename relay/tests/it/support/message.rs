//! A queued message built in a test, for tests that put mail straight into a queue
//! (not through SMTP).

use mailrelay::queue::{
    ClientInfo, Envelope, MailParams, QueueId, QueuedMessage, Recipient, now_ms,
};

/// One message from `from` to `rcpt` with `body`, as if a client on loopback had
/// handed it to a relay named `received_by`, received now.
pub fn queued(from: &str, rcpt: &str, received_by: &str, body: String) -> QueuedMessage {
    QueuedMessage {
        envelope: Envelope {
            id: QueueId::generate(),
            mail: MailParams {
                from: from.to_owned(),
                ..MailParams::default()
            },
            recipients: vec![Recipient {
                address: rcpt.to_owned(),
                notify: None,
                orcpt: None,
            }],
            client: ClientInfo {
                ip: std::net::Ipv4Addr::LOCALHOST.into(),
                port: 2525,
                helo: "client.test".into(),
                auth_user: None,
                tls: None,
                listener: "smtp".into(),
            },
            received_at_ms: now_ms(),
            received_by: received_by.into(),
        },
        body: body.into_bytes(),
    }
}
