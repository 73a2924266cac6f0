//! A real standalone `redis-server` (the shared fixture), started the way the
//! operator's tests need it: with at most a password.

use std::ops::{Deref, DerefMut};

pub struct RedisServer(mailrelay_test_support::redis::RedisServer);

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    pub fn start_with(password: Option<&str>) -> Self {
        RedisServer(mailrelay_test_support::redis::RedisServer::start_with(
            password,
            &[],
        ))
    }
}

impl Deref for RedisServer {
    type Target = mailrelay_test_support::redis::RedisServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for RedisServer {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
