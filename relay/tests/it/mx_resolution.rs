//! MX resolution against a real DNS server (dnsmasq): ordering, randomisation among
//! equal preference, implicit and null MX, NXDOMAIN, temporary failures, IPv6,
//! address literals, and exchanges without addresses.

use crate::support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mailrelay::delivery::mx::{MxHost, MxResolver, Resolution, ResolverConfig};
use support::dns::{Dnsmasq, Record, SilentNameserver};

fn config(nameserver: SocketAddr) -> ResolverConfig {
    ResolverConfig {
        nameservers: vec![nameserver],
        timeout: Duration::from_secs(3),
        attempts: 2,
        ..ResolverConfig::default()
    }
}

fn resolver(dns: &Dnsmasq) -> MxResolver {
    MxResolver::new(&config(dns.addr())).expect("build resolver")
}

fn hosts(resolution: Resolution) -> Vec<MxHost> {
    match resolution {
        Resolution::Hosts(hosts) => hosts,
        other => panic!("expected hosts, got {other:?}"),
    }
}

fn names(hosts: &[MxHost]) -> Vec<&str> {
    hosts.iter().map(|h| h.name.as_str()).collect()
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[tokio::test]
async fn hosts_come_in_preference_order() {
    let dns = Dnsmasq::start(&[
        Record::mx("order.test", 30, "c.order.test"),
        Record::mx("order.test", 10, "a.order.test"),
        Record::mx("order.test", 20, "b.order.test"),
        Record::host("a.order.test", &["127.0.0.11"]),
        Record::host("b.order.test", &["127.0.0.12"]),
        Record::host("c.order.test", &["127.0.0.13"]),
    ]);
    let got = hosts(resolver(&dns).resolve("Order.Test").await);
    assert_eq!(
        got,
        vec![
            MxHost {
                name: "a.order.test".into(),
                preference: 10,
                addrs: addrs(&["127.0.0.11:25"]),
                implicit: false,
            },
            MxHost {
                name: "b.order.test".into(),
                preference: 20,
                addrs: addrs(&["127.0.0.12:25"]),
                implicit: false,
            },
            MxHost {
                name: "c.order.test".into(),
                preference: 30,
                addrs: addrs(&["127.0.0.13:25"]),
                implicit: false,
            },
        ]
    );
}

#[tokio::test]
async fn equal_preference_is_tried_in_random_order() {
    let dns = Dnsmasq::start(&[
        Record::mx("equal.test", 10, "one.equal.test"),
        Record::mx("equal.test", 10, "two.equal.test"),
        Record::mx("equal.test", 20, "backup.equal.test"),
        Record::host("one.equal.test", &["127.0.0.21"]),
        Record::host("two.equal.test", &["127.0.0.22"]),
        Record::host("backup.equal.test", &["127.0.0.23"]),
    ]);
    let resolver = resolver(&dns);
    let mut orders = HashSet::new();
    // A fair shuffle of two hosts gives the same order 200 times with probability
    // 2^-199: if only one order shows up, the shuffle is broken, not unlucky.
    for _ in 0..200 {
        let got = hosts(resolver.resolve("equal.test").await);
        let got = names(&got);
        assert_eq!(got[2], "backup.equal.test");
        orders.insert((got[0].to_owned(), got[1].to_owned()));
    }
    assert_eq!(orders.len(), 2, "{orders:?}");
}

#[tokio::test]
async fn no_mx_falls_back_to_the_domain_address() {
    let dns = Dnsmasq::start(&[Record::host("implicit.test", &["127.0.0.31", "::1"])]);
    let got = hosts(resolver(&dns).resolve("implicit.test").await);
    assert_eq!(
        got,
        vec![MxHost {
            name: "implicit.test".into(),
            preference: 0,
            addrs: addrs(&["127.0.0.31:25", "[::1]:25"]),
            implicit: true,
        }]
    );
}

#[tokio::test]
async fn a_domain_with_neither_mx_nor_address_does_not_take_mail() {
    let dns = Dnsmasq::start(&[Record::txt("textonly.test", "v=spf1 -all")]);
    assert_eq!(
        resolver(&dns).resolve("textonly.test").await,
        Resolution::NoSuchDomain
    );
}

#[tokio::test]
async fn null_mx_refuses_mail() {
    let dns = Dnsmasq::start(&[
        Record::null_mx("nullmx.test"),
        Record::host("nullmx.test", &["127.0.0.41"]),
    ]);
    // The A record must not be used as an implicit MX: the null MX is explicit.
    assert_eq!(
        resolver(&dns).resolve("nullmx.test").await,
        Resolution::NullMx
    );
}

#[tokio::test]
async fn nxdomain_bounces() {
    let dns = Dnsmasq::start(&[Record::host("exists.test", &["127.0.0.51"])]);
    assert_eq!(
        resolver(&dns).resolve("does-not-exist.test").await,
        Resolution::NoSuchDomain
    );
}

#[tokio::test]
async fn servfail_and_refused_defer() {
    let dns = Dnsmasq::start(&[
        Record::servfail("broken.test"),
        Record::refused("refused.test"),
    ]);
    let resolver = resolver(&dns);
    for domain in ["broken.test", "refused.test"] {
        match resolver.resolve(domain).await {
            Resolution::TempFail(reason) => {
                assert!(reason.contains(domain), "{reason}");
            }
            other => panic!("{domain}: expected TempFail, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unanswering_nameserver_defers() {
    let silent = SilentNameserver::start();
    let resolver = MxResolver::new(&ResolverConfig {
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..config(silent.addr())
    })
    .unwrap();
    let started = Instant::now();
    let got = resolver.resolve("timeout.test").await;
    assert!(matches!(got, Resolution::TempFail(_)), "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the configured timeout bounds the wait: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn ipv6_and_ipv4_addresses_are_both_kept() {
    let dns = Dnsmasq::start(&[
        Record::mx("dual.test", 10, "mx.dual.test"),
        Record::mx("dual.test", 20, "v6only.dual.test"),
        Record::host("mx.dual.test", &["2001:db8::25", "127.0.0.61"]),
        Record::host("v6only.dual.test", &["::1"]),
    ]);
    let got = hosts(resolver(&dns).resolve("dual.test").await);
    assert_eq!(names(&got), ["mx.dual.test", "v6only.dual.test"]);
    // IPv4 first (see MxHost::addrs), then IPv6.
    assert_eq!(got[0].addrs, addrs(&["127.0.0.61:25", "[2001:db8::25]:25"]));
    assert_eq!(got[1].addrs, addrs(&["[::1]:25"]));
}

#[tokio::test]
async fn port_override_applies_to_every_address() {
    let dns = Dnsmasq::start(&[
        Record::mx("port.test", 10, "mx.port.test"),
        Record::host("mx.port.test", &["127.0.0.71", "::1"]),
        Record::host("implicit-port.test", &["127.0.0.72"]),
    ]);
    let resolver = MxResolver::new(&ResolverConfig {
        port_override: Some(2525),
        ..config(dns.addr())
    })
    .unwrap();
    let got = hosts(resolver.resolve("port.test").await);
    assert_eq!(got[0].addrs, addrs(&["127.0.0.71:2525", "[::1]:2525"]));
    let got = hosts(resolver.resolve("implicit-port.test").await);
    assert_eq!(got[0].addrs, addrs(&["127.0.0.72:2525"]));
    let got = hosts(resolver.resolve("[127.0.0.73]").await);
    assert_eq!(got[0].addrs, addrs(&["127.0.0.73:2525"]));
}

#[tokio::test]
async fn address_literals_skip_dns() {
    // Any query to this nameserver would hang for the whole timeout and defer.
    let silent = SilentNameserver::start();
    let resolver = MxResolver::new(&ResolverConfig {
        timeout: Duration::from_secs(30),
        ..config(silent.addr())
    })
    .unwrap();
    let got = hosts(resolver.resolve("[127.0.0.1]").await);
    assert_eq!(
        got,
        vec![MxHost {
            name: "[127.0.0.1]".into(),
            preference: 0,
            addrs: addrs(&["127.0.0.1:25"]),
            implicit: true,
        }]
    );
    let got = hosts(resolver.resolve("[IPv6:::1]").await);
    assert_eq!(got[0].addrs, addrs(&["[::1]:25"]));
    assert_eq!(
        resolver.resolve("[not-an-address]").await,
        Resolution::NoSuchDomain
    );
}

#[tokio::test]
async fn exchanges_without_address_are_skipped() {
    let dns = Dnsmasq::start(&[
        Record::mx("skip.test", 10, "ghost.skip.test"),
        Record::mx("skip.test", 20, "real.skip.test"),
        Record::host("real.skip.test", &["127.0.0.81"]),
        Record::mx("nowhere.test", 10, "ghost1.nowhere.test"),
        Record::mx("nowhere.test", 20, "ghost2.nowhere.test"),
    ]);
    let resolver = resolver(&dns);
    let got = hosts(resolver.resolve("skip.test").await);
    assert_eq!(names(&got), ["real.skip.test"]);
    assert_eq!(got[0].preference, 20);
    // MX records that all lead nowhere defer (the zone may be half-updated).
    match resolver.resolve("nowhere.test").await {
        Resolution::TempFail(reason) => {
            assert!(reason.contains("ghost1.nowhere.test"), "{reason}");
        }
        other => panic!("expected TempFail, got {other:?}"),
    }
}

#[tokio::test]
async fn own_hostname_in_the_mx_list() {
    let dns = Dnsmasq::start(&[
        Record::mx("backup.test", 10, "primary.backup.test"),
        Record::mx("backup.test", 20, "relay.backup.test"),
        Record::mx("backup.test", 30, "tertiary.backup.test"),
        Record::host("primary.backup.test", &["127.0.0.91"]),
        Record::host("relay.backup.test", &["127.0.0.92"]),
        Record::host("tertiary.backup.test", &["127.0.0.93"]),
        Record::mx("loop.test", 10, "relay.backup.test"),
        Record::mx("loop.test", 20, "primary.backup.test"),
    ]);
    let resolver = resolver(&dns).with_local_names(["RELAY.backup.test"]);
    // As a backup MX we hand mail only to better-preferred hosts.
    let got = hosts(resolver.resolve("backup.test").await);
    assert_eq!(names(&got), ["primary.backup.test"]);
    // As the best MX, delivering would loop.
    assert_eq!(resolver.resolve("loop.test").await, Resolution::LoopsToSelf);
}

#[tokio::test]
async fn unicode_domains_are_looked_up_as_a_labels() {
    let dns = Dnsmasq::start(&[
        Record::mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test"),
        Record::host("mx.xn--bcher-kva.test", &["127.0.0.101"]),
    ]);
    let got = hosts(resolver(&dns).resolve("Bücher.test").await);
    assert_eq!(names(&got), ["mx.xn--bcher-kva.test"]);
}
