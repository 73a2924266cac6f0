//! The config file as a whole: defaults, field-named errors, env overrides.

use super::*;

#[test]
fn defaults_are_a_safe_local_relay() {
    let c = RelayConfig::from_yaml("{}").unwrap();
    assert_eq!(c.listeners[0].address, "127.0.0.1:2525".parse().unwrap());
    assert_eq!(c.admin.address, Some("127.0.0.1:9325".parse().unwrap()));
    assert_eq!(c.queue.effective_backend(), QueueBackendKind::Embedded);
    assert_eq!(c.queue.path, PathBuf::from("./mailrelay-data"));
    assert!(c.relay_networks.iter().all(|n| n.addr().is_loopback()));
}

#[test]
fn connection_fairness_limits_parse() {
    let c = RelayConfig::from_yaml("{}").unwrap();
    assert_eq!(c.limits.reserved_connections, 50);
    assert_eq!(c.limits.evict_idle_after, Duration::from_secs(10));
    let c = RelayConfig::from_yaml(
        "limits: {max_connections: 4, reserved_connections: 9, evict_idle_after: 0s}\n",
    )
    .unwrap();
    assert_eq!(c.limits.reserved_connections, 9);
    assert!(c.limits.evict_idle_after.is_zero());
    let e = RelayConfig::from_yaml("limits: {evict_idle_after: soon}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.evict_idle_after"), "{e}");
}

#[test]
fn auth_throttle_defaults_and_bad_values_are_named() {
    let c = RelayConfig::from_yaml("auth: {users_file: /u}\n").unwrap();
    let t = &c.auth.unwrap().throttle;
    assert_eq!(t.max_failures, 10);
    assert_eq!(t.delay, Duration::from_secs(1));
    assert_eq!(t.lockout, Duration::from_secs(900));
    let c = RelayConfig::from_yaml(
        "auth: {users_file: /u, throttle: {delay: 50ms, max_failures: 3, lockout: 2s}}\n",
    )
    .unwrap();
    let t = &c.auth.unwrap().throttle;
    assert_eq!((t.delay, t.max_failures), (Duration::from_millis(50), 3));
    assert_eq!(t.window, Duration::from_secs(900));
    for (yaml, field) in [
        ("{delay: 5s, max_delay: 1s}", "auth.throttle.max_delay"),
        ("{window: 0s}", "auth.throttle.window"),
        ("{lockout: 0s}", "auth.throttle.lockout"),
        ("{lockot: 1s}", "lockot"),
    ] {
        let e = RelayConfig::from_yaml(&format!("auth: {{users_file: /u, throttle: {yaml}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{yaml}: {e}");
    }
}

#[test]
fn unknown_field_is_named() {
    let e = RelayConfig::from_yaml("limits:\n  max_mesage_size: 10\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits"), "{e}");
    assert!(e.contains("max_mesage_size"), "{e}");
}

#[test]
fn slow_client_limits_parse_and_are_checked() {
    let c = RelayConfig::from_yaml(
        "limits:\n  data_min_rate: 1000\n  data_rate_window: 10s\n  data_deadline: 5m\n  \
         data_oversize_drain: 0\n  max_connections_per_network: 0\n  network_prefix_v6: 48\n",
    )
    .unwrap();
    let l = &c.limits;
    assert_eq!(
        (l.data_min_rate, l.data_rate_window, l.data_deadline),
        (1000, Duration::from_secs(10), Duration::from_secs(300))
    );
    assert_eq!(
        (l.data_oversize_drain, l.max_connections_per_network),
        (0, 0)
    );
    assert_eq!((l.network_prefix_v4, l.network_prefix_v6), (24, 48));
    for (yaml, field) in [
        (
            "limits:\n  data_rate_window: 0s\n",
            "limits.data_rate_window",
        ),
        ("limits:\n  data_deadline: 0s\n", "limits.data_deadline"),
        (
            "limits:\n  network_prefix_v4: 33\n",
            "limits.network_prefix_v4",
        ),
        (
            "limits:\n  network_prefix_v6: 0\n",
            "limits.network_prefix_v6",
        ),
    ] {
        let e = RelayConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(e.contains(field), "{yaml}: {e}");
    }
    // Without a minimum rate the window does not matter.
    RelayConfig::from_yaml("limits:\n  data_min_rate: 0\n  data_rate_window: 0s\n").unwrap();
}

#[test]
fn invalid_values_are_named() {
    let e = RelayConfig::from_yaml("limits:\n  command_timeout: 5 parsecs\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.command_timeout"), "{e}");
    let e = RelayConfig::from_yaml("relay_networks: [0.0.0.0/0]\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("relay_networks[0]") && e.contains("open relay"),
        "{e}"
    );
    let e = RelayConfig::from_yaml("listeners: [{name: a, address: '127.0.0.1:1', tls: implicit}]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listeners[0].tls"), "{e}");
    let e = RelayConfig::from_yaml("listeners: [{address: 'nope'}]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listeners[0].address"), "{e}");
    let e = RelayConfig::from_yaml("queue: {backend: redis}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("queue.redis"), "{e}");
}

#[test]
fn env_overrides_secrets_and_redacts_them() {
    let mut c = RelayConfig::from_yaml("queue: {redis: {url: 'redis://127.0.0.1:1'}}").unwrap();
    c.apply_env(|k| match k {
        "MAILRELAY_REDIS_PASSWORD" => Some("hunter2".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        c.queue.redis.as_ref().unwrap().password.as_ref().unwrap().0,
        "hunter2"
    );
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn sentinel_urls_are_validated_at_load() {
    let c = RelayConfig::from_yaml(
        "queue: {redis: {url: 'redis+sentinel://:pw@s1,s2:26380/mymaster/2'}}",
    )
    .unwrap();
    assert_eq!(c.queue.effective_backend(), QueueBackendKind::Redis);
    for (yaml, want) in [
        ("url: 'redis+sentinel://:hunter2@/m'", "no sentinel hosts"),
        ("url: 'redis+sentinel://:hunter2@h'", "master name"),
        ("url: 'redis+sentinel://:hunter2@h:99999/m'", "bad port"),
        (
            "{url: 'redis+sentinel://:hunter2@h/m', cluster: true}",
            "cluster",
        ),
        ("url: 'sentinel://h/m'", "redis+sentinel://"),
    ] {
        let yaml = if yaml.starts_with('{') {
            format!("queue: {{redis: {yaml}}}")
        } else {
            format!("queue: {{redis: {{{yaml}}}}}")
        };
        let e = RelayConfig::from_yaml(&yaml).unwrap_err().to_string();
        assert!(
            e.contains("queue.redis.url") && e.contains(want),
            "{yaml}: {e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }
    // The env override is validated too.
    let mut c = RelayConfig::from_yaml("{}").unwrap();
    let e = c
        .apply_env(|k| (k == "MAILRELAY_REDIS_URL").then(|| "redis+sentinel://h:0/m".into()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("queue.redis.url") && e.contains("bad port"),
        "{e}"
    );
    // Neither password shows in Debug output.
    let mut c = RelayConfig::from_yaml(
        "queue: {redis: {url: 'redis+sentinel://u:hunter2@h/m', cluster_nodes: ['redis://:hunter3@n']}}",
    )
    .unwrap();
    c.apply_env(|k| (k == "MAILRELAY_REDIS_PASSWORD").then(|| "hunter4".into()))
        .unwrap();
    let debug = format!("{c:?}");
    assert!(
        debug.contains("redis+sentinel://u:<redacted>@h/m"),
        "{debug}"
    );
    for pw in ["hunter2", "hunter3", "hunter4"] {
        assert!(!debug.contains(pw), "{debug}");
    }
}

#[test]
fn queue_cache_size_is_small_by_default_and_bounded() {
    let c = RelayConfig::from_yaml("{}").unwrap();
    assert_eq!(c.queue.cache_size, 32 << 20);
    let yaml = serde_norway::to_string(&c).unwrap();
    assert!(!yaml.contains("cache_size"), "{yaml}");
    let c = RelayConfig::from_yaml("queue: {cache_size: 268435456}").unwrap();
    assert_eq!(c.queue.cache_size, 256 << 20);
    let yaml = serde_norway::to_string(&c).unwrap();
    assert!(yaml.contains("cache_size: 268435456"), "{yaml}");
    let e = RelayConfig::from_yaml("queue: {cache_size: 4096}")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("queue.cache_size") && e.contains("minimum"),
        "{e}"
    );
}

#[test]
fn shutdown_settle_defaults_to_none_and_is_bounded() {
    let c = RelayConfig::from_yaml("{}").unwrap();
    assert_eq!(c.shutdown_settle, Duration::ZERO);
    let c = RelayConfig::from_yaml("shutdown_settle: 10s").unwrap();
    assert_eq!(c.shutdown_settle, Duration::from_secs(10));
    // Rendered back as it is written, so the operator's output round-trips; left
    // out when off, so configs rendered before it existed stay as they were.
    let yaml = serde_norway::to_string(&c).unwrap();
    assert!(yaml.contains("shutdown_settle: 10s"), "{yaml}");
    let yaml = serde_norway::to_string(&RelayConfig::default()).unwrap();
    assert!(!yaml.contains("shutdown_settle"), "{yaml}");
    let c = RelayConfig::from_yaml("shutdown_settle: 5m").unwrap();
    assert_eq!(c.shutdown_settle, MAX_SHUTDOWN_SETTLE);
    for (yaml, want) in [
        ("shutdown_settle: 301s", "longer than 5m"),
        ("shutdown_settle: 3600", "longer than 5m"),
        ("shutdown_settle: soon", "shutdown_settle"),
    ] {
        let e = RelayConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(
            e.contains("shutdown_settle") && e.contains(want),
            "{yaml}: {e}"
        );
    }
}

#[test]
fn delivery_section_defaults_and_errors() {
    let c = RelayConfig::from_yaml("{}").unwrap();
    assert!(c.delivery.enabled);
    assert_eq!(c.delivery.max_concurrency, 50);
    assert_eq!(c.delivery.lease, Duration::from_secs(30));
    assert_eq!(c.delivery.wake_delay, Duration::from_millis(20));
    let e = RelayConfig::from_yaml("delivery: {poll_interval: 1s, wake_delay: 2s}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("delivery.wake_delay"), "{e}");
    assert_eq!(c.delivery.outcome_batch, OutcomeBatchConfig::default());
    assert_eq!(c.delivery.outcome_batch.max_messages, 32);
    let b = RelayConfig::from_yaml("delivery: {outcome_batch: {max_messages: 8, max_delay: 10ms}}")
        .unwrap()
        .delivery
        .outcome_batch;
    assert_eq!(
        (b.max_messages, b.max_delay),
        (8, Duration::from_millis(10))
    );
    for (yaml, field) in [
        ("{max_messages: 0}", "delivery.outcome_batch.max_messages"),
        ("{max_delay: 0s}", "delivery.outcome_batch.max_delay"),
        ("{max_delay: 2m}", "delivery.outcome_batch.max_delay"),
        ("{max_messgaes: 2}", "max_messgaes"),
    ] {
        let e = RelayConfig::from_yaml(&format!("delivery: {{outcome_batch: {yaml}}}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{yaml}: {e}");
    }
    // MX delivery follows what each domain publishes (MTA-STS) unless told otherwise.
    assert_eq!(c.delivery.tls, TlsPolicy::Auto);
    let d = RelayConfig::from_yaml(
        "delivery: {tls_policies: [{domains: [bank.example, .bank.example], tls: required}], \
         mta_sts: {fetch_timeout: 5s, ca_file: /tmp/ca.pem}}",
    )
    .unwrap()
    .delivery;
    assert_eq!(d.tls_policies[0].tls, TlsPolicy::Required);
    assert_eq!(d.mta_sts.fetch_timeout, Duration::from_secs(5));
    // DANE is part of `auto` by default; `dane` is a policy of its own.
    assert!(d.dane.enabled && d.dane.trust_anchor.is_none());
    let d = RelayConfig::from_yaml(
        "delivery: {tls: dane, dane: {trust_anchor: /etc/anchor.key, nameservers: ['10.0.0.53:53']}}",
    )
    .unwrap()
    .delivery;
    assert_eq!(d.tls, TlsPolicy::Dane);
    assert_eq!(d.dane.nameservers, vec!["10.0.0.53:53".parse().unwrap()]);
    for (yaml, field) in [
        (
            "{tls_policies: [{domains: [], tls: required}]}",
            "delivery.tls_policies[0].domains",
        ),
        (
            "{tls_policies: [{domains: ['a b'], tls: required}]}",
            "delivery.tls_policies[0].domains",
        ),
        (
            "{tls_policies: [{domains: [a.test], tls: maybe}]}",
            "tls_policies",
        ),
        (
            "{mta_sts: {fetch_timeout: 0s}}",
            "delivery.mta_sts.fetch_timeout",
        ),
        ("{mta_sts: {max_size: 1}}", "max_size"),
        (
            "{dane: {enabled: false}, tls_policies: [{domains: [a.test], tls: dane}]}",
            "delivery.tls_policies[0].tls",
        ),
        ("{dane: {enabled: false}, tls: dane}", "delivery.tls"),
        ("{dane: {nameservers: [10.0.0.1]}}", "nameservers"),
        ("{dane: {anchor: /x}}", "anchor"),
    ] {
        let e = RelayConfig::from_yaml(&format!("delivery: {yaml}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{yaml}: {e}");
    }
    let c = RelayConfig::from_yaml(
        "delivery: {smarthost: {host: smtp.example.com, username: u, tls: required}, retry: {first: 1s}}",
    )
    .unwrap();
    let s = c.delivery.smarthost.as_ref().unwrap();
    assert_eq!((s.port, s.tls), (587, TlsPolicy::Required));
    assert_eq!(c.delivery.retry.first, Duration::from_secs(1));
    let e = RelayConfig::from_yaml("delivery: {per_destination_concurrency: 0}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("delivery.per_destination_concurrency"), "{e}");
    let e = RelayConfig::from_yaml("delivery: {smarthost: {host: h, prot: 1}}")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("delivery.smarthost") && e.contains("prot"),
        "{e}"
    );
    let mut c = RelayConfig::from_yaml("delivery: {smarthost: {host: h}}").unwrap();
    c.apply_env(|k| (k == "MAILRELAY_SMARTHOST_USERNAME").then(|| "envuser".into()))
        .unwrap();
    assert_eq!(
        c.delivery.smarthost.as_ref().unwrap().username.as_deref(),
        Some("envuser")
    );
    let mut c = RelayConfig::from_yaml("delivery: {smarthost: {host: h, username: u}}").unwrap();
    c.apply_env(|k| (k == "MAILRELAY_SMARTHOST_PASSWORD").then(|| "pw".into()))
        .unwrap();
    assert!(!format!("{c:?}").contains("pw\""));
}

#[test]
fn routes_are_checked_and_take_passwords_from_env() {
    let mut c = RelayConfig::from_yaml(
        "delivery: {routes: [{domains: [Partner.Example., .partner.example], host: 10.0.0.5, \
         username: u, password_env: PARTNER_PW, tls: required}]}",
    )
    .unwrap();
    let r = &c.delivery.routes[0];
    assert_eq!(r.remote.port, 25);
    assert_eq!(
        r.normalized_domains().collect::<Vec<_>>(),
        ["partner.example", ".partner.example"]
    );
    let e = c.clone().apply_env(|_| None).unwrap_err().to_string();
    assert!(
        e.contains("delivery.routes[0].password_env") && e.contains("PARTNER_PW"),
        "{e}"
    );
    c.apply_env(|k| (k == "PARTNER_PW").then(|| "s3cret".into()))
        .unwrap();
    assert_eq!(
        c.delivery.routes[0]
            .remote
            .password
            .as_ref()
            .map(|p| p.0.as_str()),
        Some("s3cret")
    );
    assert!(!format!("{c:?}").contains("s3cret"));
    for (yaml, field) in [
        ("{domains: [], host: h}", "delivery.routes[0].domains"),
        ("{domains: ['a b'], host: h}", "delivery.routes[0].domains"),
        ("{domains: [a.test], host: ''}", "delivery.routes[0].host"),
        (
            "{domains: [a.test], host: h, port: 0}",
            "delivery.routes[0].port",
        ),
        (
            "{domains: [a.test], host: h, username: u, tls: disabled}",
            "delivery.routes[0].tls",
        ),
        (
            "{domains: [a.test], host: h, password: p}",
            "delivery.routes[0].username",
        ),
        (
            "{domains: [a.test], host: h}, {domains: [A.test], host: g}",
            "delivery.routes[1].domains",
        ),
        ("{domains: [a.test], hots: h}", "hots"),
    ] {
        let e = RelayConfig::from_yaml(&format!("delivery: {{routes: [{yaml}]}}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{yaml}: {e}");
    }
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mailrelay.yaml");
    RelayConfig::from_file(&path).unwrap();
}

#[test]
fn sender_binding_parses_and_bad_values_are_named() {
    let c = RelayConfig::from_yaml(
        "relay_networks: [10.1.0.0/16]\nsender_binding:\n  users: {alice: [a.example, '<>']}\n  networks: [{network: 10.1.2.0/24, senders: ['*@c.example']}]\n",
    )
    .unwrap();
    let b = c.sender_binding.unwrap();
    assert!(!b.required && !b.check_from_header);
    assert_eq!(b.users["alice"], ["a.example", "<>"]);
    for (yaml, field) in [
        ("users: {alice: []}", "sender_binding.users.alice"),
        ("users: {alice: ['<a@b>']}", "sender_binding.users.alice[0]"),
        ("users: {alice: ['a@b@c']}", "sender_binding.users.alice[0]"),
        (
            "networks: [{network: 10.2.0.0/16, senders: [x.example]}]",
            "sender_binding.networks[0].network",
        ),
        (
            "networks: [{network: 10.1.0.0/16, senders: ['']}]",
            "sender_binding.networks[0].senders[0]",
        ),
    ] {
        let e = RelayConfig::from_yaml(&format!(
            "relay_networks: [10.1.0.0/16]\nsender_binding: {{{yaml}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(field), "{yaml}: {e}");
    }
}

#[test]
fn redis_fresh_list_defaults_on_and_is_set_by_config_or_env() {
    let redis = |c: &RelayConfig| c.queue.redis.clone().unwrap();
    let c = RelayConfig::from_yaml("queue: {redis: {url: 'redis://h:6379'}}").unwrap();
    assert!(redis(&c).fresh_list);
    // Left out of rendered configs while it has its default.
    assert!(
        !serde_norway::to_string(&redis(&c))
            .unwrap()
            .contains("fresh_list")
    );
    let mut c =
        RelayConfig::from_yaml("queue: {redis: {url: 'redis://h:6379', fresh_list: false}}")
            .unwrap();
    assert!(!redis(&c).fresh_list);
    c.apply_env(|k| (k == "MAILRELAY_REDIS_FRESH_LIST").then(|| "true".into()))
        .unwrap();
    assert!(redis(&c).fresh_list);
    c.apply_env(|k| (k == "MAILRELAY_REDIS_FRESH_LIST").then(|| "false".into()))
        .unwrap();
    assert!(!redis(&c).fresh_list);
    let e = c
        .apply_env(|k| (k == "MAILRELAY_REDIS_FRESH_LIST").then(|| "maybe".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MAILRELAY_REDIS_FRESH_LIST"), "{e}");
    let mut c = RelayConfig::from_yaml("{}").unwrap();
    let e = c
        .apply_env(|k| (k == "MAILRELAY_REDIS_FRESH_LIST").then(|| "false".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MAILRELAY_REDIS_FRESH_LIST"), "{e}");
    let e = RelayConfig::from_yaml("queue: {redis: {url: 'redis://h:6379', fresh_list: 3}}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("fresh_list"), "{e}");
}

#[test]
fn worker_threads_default_to_the_cpus_and_bad_counts_are_named() {
    let c = RelayConfig::from_yaml("{}").unwrap();
    assert_eq!(c.runtime.worker_threads, None);
    // The default is left out of a rendered config (the operator's ConfigMap).
    assert!(!serde_norway::to_string(&c).unwrap().contains("runtime"));
    let c = RelayConfig::from_yaml("runtime: {worker_threads: 3}\n").unwrap();
    assert_eq!(c.runtime.worker_threads, Some(3));
    for bad in ["0", "257"] {
        let e = RelayConfig::from_yaml(&format!("runtime: {{worker_threads: {bad}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runtime.worker_threads") && e.contains("1-256"),
            "{e}"
        );
    }
    let e = RelayConfig::from_yaml("runtime: {threads: 2}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("runtime"), "{e}");
}
