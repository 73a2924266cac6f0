//! The harness itself: a relay starts on free ports with the embedded queue, takes a
//! message over raw SMTP, and the message is in the queue after a graceful stop.

use crate::support;

use support::relay::{Relay, RelayOptions, code};

#[test]
fn relay_accepts_and_queues_one_message() {
    let mut relay = Relay::start(RelayOptions::default());
    let mut c = relay.connect();
    assert_eq!(code(&c.greeting), 220, "{}", c.greeting);
    assert_eq!(code(&c.cmd("EHLO client.test")), 250);
    assert_eq!(code(&c.cmd("MAIL FROM:<a@client.test>")), 250);
    assert_eq!(code(&c.cmd("RCPT TO:<b@dest.test>")), 250);
    assert_eq!(code(&c.cmd("DATA")), 354);
    let r = c.cmd("Subject: smoke\r\n\r\nhello\r\n.");
    assert_eq!(code(&r), 250, "{r}");
    assert_eq!(code(&c.cmd("QUIT")), 221);
    let (status, _) = relay.admin_get("/readyz");
    assert_eq!(status, 200);
    assert!(relay.stop().success());
    let msgs = relay.queued_messages();
    assert_eq!(msgs.len(), 1);
    assert!(r.contains(msgs[0].envelope.id.as_str()));
    assert!(
        msgs[0]
            .body
            .ends_with(b"\r\nSubject: smoke\r\n\r\nhello\r\n")
    );
}
