//! Quota counter stores against a real `redis-server`: the Lua sliding window gives
//! exactly the answers of the Rust model (the embedded store) on random request
//! sequences, a check is one round trip however many quotas it covers, checks from
//! several connections never admit more than the limit, counters expire on their
//! own, and a check of several quotas works in Redis Cluster (one slot).

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailrelay::queue::RedisQueue;
use mailrelay::quota::ingress::memory::MemoryStore;
use mailrelay::quota::ingress::redis::RedisStore;
use mailrelay::quota::ingress::store::{ChargeRequest, CounterStore};
use mailrelay::quota::ingress::window::WindowSpec;
use rand::{Rng, SeedableRng};
use support::redis::{RedisCluster, RedisServer};

async fn redis_store(cfg: &mailrelay::config::RedisConfig) -> RedisStore {
    let q = RedisQueue::connect(cfg).await.expect("connect to redis");
    RedisStore::new(q.shared())
        .await
        .expect("load quota scripts")
}

fn req(quota: &str, key: &str, cost: u64, windows: &[WindowSpec]) -> ChargeRequest {
    ChargeRequest {
        quota: quota.into(),
        key: key.into(),
        cost,
        windows: windows.to_vec(),
    }
}

/// Random checks, refunds and usage reads against Redis and the model in step;
/// windows `scale` times as long as the shortest kind. Returns how many checks
/// were allowed and denied, and how many refunds were made. With `new_keys` > 0
/// the keys are that many senders new to each seed (and a shared one), so that many
/// checks are a key's first: Redis holds no state of it yet.
async fn agree_with_the_model(
    redis: &RedisStore,
    seeds: std::ops::Range<u64>,
    scale: u64,
    new_keys: usize,
) -> (u32, u32, u32) {
    let (mut allowed, mut denied, mut refunds) = (0, 0, 0);
    for seed in seeds {
        let model = MemoryStore::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Fresh quota names per seed: no state carries over in Redis.
        let quotas: Vec<(String, Vec<WindowSpec>)> = (0..3)
            .map(|i| {
                let windows = match i {
                    0 => vec![WindowSpec::new(
                        rng.random_range(1..8),
                        scale * rng.random_range(50..3_000),
                    )],
                    1 => vec![
                        WindowSpec::new(
                            rng.random_range(3..15),
                            scale * rng.random_range(1_000..10_000),
                        ),
                        WindowSpec::new(
                            rng.random_range(10..40),
                            scale * rng.random_range(20_000..200_000),
                        ),
                    ],
                    _ => vec![WindowSpec::new(
                        rng.random_range(20..200),
                        rng.random_range(500..5_000),
                    )],
                };
                (format!("s{seed}q{i}"), windows)
            })
            .collect();
        let keys: Vec<String> = if new_keys == 0 {
            ["alice@a.test", "bob@b.test", "*"]
                .map(String::from)
                .to_vec()
        } else {
            // And one key every check may share, new to the seed too: Redis keeps
            // `*` of an earlier seed, whose clock ran later (and the seeds' clocks
            // go back), which a relay's clock does not.
            (0..new_keys)
                .map(|i| format!("s{seed}n{i}@new.test"))
                .chain([format!("s{seed}*")])
                .collect()
        };
        let mut now = 1_700_000_000_000u64 + rng.random_range(0..1_000_000);
        let mut charges: Vec<(Vec<ChargeRequest>, u64)> = Vec::new();
        for step in 0..600 {
            now += match rng.random_range(0..10) {
                0 => rng.random_range(0..20_000),
                1..=3 => 0,
                _ => rng.random_range(0..200),
            };
            // Now and then the clock steps back (an NTP correction) by less than the
            // shortest window: the charge goes to the bucket of that earlier time.
            if rng.random_range(0..50) == 0 {
                now -= rng.random_range(0..40);
            }
            match rng.random_range(0..20) {
                0 if !charges.is_empty() => {
                    let (reqs, at) = charges.swap_remove(rng.random_range(0..charges.len()));
                    model.refund(&reqs, at).await.unwrap();
                    redis.refund(&reqs, at).await.unwrap();
                    refunds += 1;
                }
                1 => {
                    let (name, windows) = &quotas[rng.random_range(0..3)];
                    let ks: Vec<String> = keys.clone();
                    let a = model.usage(name, &ks, windows, Some(now)).await.unwrap();
                    let b = redis.usage(name, &ks, windows, Some(now)).await.unwrap();
                    assert_eq!(a, b, "seed {seed} step {step}: usage");
                    let longest = *windows.iter().max_by_key(|w| w.window_ms).unwrap();
                    let mut a = model.active_keys(name, longest, Some(now)).await.unwrap();
                    let mut b = redis.active_keys(name, longest, Some(now)).await.unwrap();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "seed {seed} step {step}: active keys");
                }
                _ => {
                    let n = rng.random_range(1..=3);
                    let reqs: Vec<ChargeRequest> = (0..n)
                        .map(|i| {
                            let (name, windows) = &quotas[(i + step) % 3];
                            req(
                                name,
                                &keys[rng.random_range(0..keys.len())],
                                rng.random_range(1..4),
                                windows,
                            )
                        })
                        .collect();
                    let a = model.check_and_charge(&reqs, Some(now)).await.unwrap();
                    let b = redis.check_and_charge(&reqs, Some(now)).await.unwrap();
                    assert_eq!(a, b, "seed {seed} step {step}: {reqs:?}");
                    if a.allowed {
                        allowed += 1;
                        charges.push((reqs, now));
                    } else {
                        denied += 1;
                    }
                }
            }
        }
    }
    (allowed, denied, refunds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_agrees_with_the_model_on_random_sequences() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    let (allowed, denied, refunds) = agree_with_the_model(&redis, 0..12, 1, 0).await;
    // The sequences exercised every path.
    assert!(
        allowed > 1000 && denied > 1000 && refunds > 50,
        "{allowed} {denied} {refunds}"
    );
}

/// The same with windows of minutes to hours: most checks go by the tallies of a
/// remembered state (one `HGET`), including ones that do not fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_agrees_with_the_model_checking_by_tallies() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    let (allowed, denied, refunds) = agree_with_the_model(&redis, 100..106, 300, 0).await;
    assert!(
        allowed > 500 && denied > 500 && refunds > 20,
        "{allowed} {denied} {refunds}"
    );
    // Reads of `a` alone: checks by tallies (full reads are HMGET).
    let by_tallies = calls(&server, "hget");
    assert!(by_tallies > 300, "{by_tallies} checks by tallies");
}

/// The same where most checks are a key's first (many senders, each new to Redis):
/// the check of a key with no state builds it in one pass, and must answer as the
/// model does, refusals and a first charge that fills a window included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_agrees_with_the_model_on_keys_it_has_not_seen() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    let (allowed, denied, refunds) = agree_with_the_model(&redis, 200..206, 1, 150).await;
    assert!(
        allowed > 500 && denied > 100 && refunds > 20,
        "{allowed} {denied} {refunds}"
    );
    // New keys were indexed without reading their index entry first: a known key
    // reads it (`ZSCORE`) before every `ZADD`, a new key does not.
    let (zadd, zscore) = (calls(&server, "zadd"), calls(&server, "zscore"));
    assert!(zadd > zscore + 500, "{zadd} ZADD, {zscore} ZSCORE");
}

/// A key's first check that does not fit stores nothing (no state without an
/// expiry); the first that fits stores its state with one, and indexes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_keys_state_is_stored_only_when_charged_and_always_expires() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    let windows = [WindowSpec::new(3, 60_000), WindowSpec::new(10, 3_600_000)];
    let refused = redis
        .check_and_charge(&[req("first", "new@a.test", 5, &windows)], None)
        .await
        .unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.checks[0][0].used, 0);
    assert_eq!(
        refused.checks[0][0].retry_at, None,
        "5 never fits a limit of 3"
    );
    assert_eq!(server.cli(&["DBSIZE"]).unwrap(), "0");

    // Exactly the limit: allowed, and the detailed reply says the window is full.
    let full = redis
        .check_and_charge(&[req("first", "new@a.test", 3, &windows)], None)
        .await
        .unwrap();
    assert!(full.allowed);
    assert_eq!(full.checks[0][0].used, 3);
    assert!(full.checks[0][0].free_at > full.now, "{full:?}");
    let hash = "qt:{qt:quota}:c:new@a.test";
    let ttl: i64 = server.cli(&["PTTL", hash]).unwrap().parse().unwrap();
    let keep = 3_660_000 + 3_660_000 / 16;
    assert!((keep - 5_000..=keep).contains(&ttl), "pttl {ttl}");
    let score: f64 = server
        .cli(&["ZSCORE", "qt:{qt:quota}:keys", "new@a.test"])
        .unwrap()
        .parse()
        .unwrap();
    assert!(score > full.now as f64, "{score}");
    let index_ttl: i64 = server
        .cli(&["PTTL", "qt:{qt:quota}:keys"])
        .unwrap()
        .parse()
        .unwrap();
    assert!(index_ttl > keep - 5_000, "index pttl {index_ttl}");
    let next = redis
        .check_and_charge(&[req("first", "new@a.test", 1, &windows)], None)
        .await
        .unwrap();
    assert!(!next.allowed);
    assert_eq!(next.checks[0][0].used, 3);
    let u = redis
        .usage("first", &["new@a.test".into()], &windows, None)
        .await
        .unwrap();
    assert_eq!((u.keys[0][0].used, u.keys[0][1].used), (3, 3));
}

/// `INFO commandstats` counts: how many times Redis ran `cmd`.
fn calls(server: &RedisServer, cmd: &str) -> u64 {
    let info = server.cli(&["INFO", "commandstats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_check_however_many_quotas() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    let windows = [
        WindowSpec::new(1_000_000, 60_000),
        WindowSpec::new(10_000_000, 3_600_000),
    ];
    let reqs: Vec<ChargeRequest> = (0..10)
        .map(|i| req(&format!("q{i}"), &format!("sender{i}@a.test"), 1, &windows))
        .collect();
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    for _ in 0..50 {
        assert!(redis.check_and_charge(&reqs, None).await.unwrap().allowed);
    }
    assert_eq!(calls(&server, "evalsha"), 50);
    assert_eq!(calls(&server, "eval"), 0);
    assert_eq!(
        calls(&server, "script|load"),
        0,
        "scripts were loaded at start"
    );
}

/// Three connections (three relay processes) race for a limit of 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_never_admit_more_than_the_limit() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let cfg = server.config("qt");
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(redis_store(&cfg).await));
    }
    let windows = vec![WindowSpec::new(100, 3_600_000)];
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..30 {
        let store = Arc::clone(&stores[t % 3]);
        let windows = windows.clone();
        tasks.spawn(async move {
            let mut ok = 0;
            for _ in 0..40 {
                let r = [req("race", "*", 1, &windows)];
                if store.check_and_charge(&r, None).await.unwrap().allowed {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut allowed = 0;
    while let Some(n) = tasks.join_next().await {
        allowed += n.unwrap();
    }
    assert_eq!(allowed, 100);
    let u = stores[0]
        .usage("race", &["*".into()], &windows, None)
        .await
        .unwrap();
    assert_eq!(u.keys[0][0].used, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_expire_on_their_own() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    let windows = [WindowSpec::new(10, 1_000), WindowSpec::new(10, 2_000)];
    redis
        .check_and_charge(&[req("short", "k", 1, &windows)], None)
        .await
        .unwrap();
    let keys = server
        .cli(&["--scan", "--pattern", "qt:{qt:quota}:*"])
        .unwrap();
    // The key's hash (both windows) and the index of keys.
    assert_eq!(keys.lines().count(), 2, "{keys}");
    for k in keys.lines() {
        let ttl: i64 = server.cli(&["PTTL", k]).unwrap().parse().unwrap();
        // One window plus one bucket, and a sixteenth more.
        assert!((1..=2_034 + 2_034 / 16).contains(&ttl), "{k}: pttl {ttl}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.cli(&["DBSIZE"]).unwrap() != "0" {
        assert!(Instant::now() < deadline, "quota keys did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_check_of_several_quotas_works_in_a_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let redis = redis_store(&cluster.config("qt")).await;
    let w = [WindowSpec::new(2, 60_000)];
    let reqs = [
        req("per-sender", "alice@a.test", 1, &w),
        req("per-user", "svc", 1, &w),
        req("all", "*", 1, &w),
    ];
    for _ in 0..2 {
        assert!(redis.check_and_charge(&reqs, None).await.unwrap().allowed);
    }
    let o = redis.check_and_charge(&reqs, None).await.unwrap();
    assert!(!o.allowed);
    assert!(
        o.checks
            .iter()
            .all(|c| c[0].used == 2 && c[0].retry_at.unwrap() > o.now)
    );
    let active = redis.active_keys("per-sender", w[0], None).await.unwrap();
    assert_eq!(active, vec![("alice@a.test".to_owned(), 2)]);
}

/// In a cluster, keys in different buckets are checked by one script each: when
/// one refuses, what the others charged is refunded (all or nothing, as in one
/// script), and every key is still listed by the usage API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_one_slot_refunds_the_others_in_a_cluster() {
    use mailrelay::quota::ingress::redis::counter_key;
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let redis = redis_store(&cluster.config("qt")).await;
    let (tight, loose) = ([WindowSpec::new(1, 60_000)], [WindowSpec::new(10, 60_000)]);
    // Two keys in different slots (the buckets are spread over the slot range).
    let (a, b) = ("alice@a.test", "svc");
    let slot = |k: &str| redis::cluster_routing::Slot::for_key(counter_key("qt", true, k));
    assert_ne!(slot(a), slot(b));
    let reqs = [
        req("per-sender", a, 1, &tight),
        req("per-user", b, 1, &loose),
    ];
    assert!(redis.check_and_charge(&reqs, None).await.unwrap().allowed);
    let o = redis.check_and_charge(&reqs, None).await.unwrap();
    assert!(!o.allowed);
    // The user's key was charged by its own script, then refunded.
    let u = redis
        .usage("per-user", &[b.to_owned()], &loose, None)
        .await
        .unwrap();
    assert_eq!(u.keys[0][0].used, 1);
    let u = redis
        .usage("per-sender", &[a.to_owned()], &tight, None)
        .await
        .unwrap();
    assert_eq!(u.keys[0][0].used, 1);
    let active = redis.active_keys("per-user", loose[0], None).await.unwrap();
    assert_eq!(active, vec![(b.to_owned(), 1)]);
}

fn message(n: usize) -> mailrelay::queue::QueuedMessage {
    use mailrelay::queue::{ClientInfo, Envelope, MailParams, QueueId, QueuedMessage, Recipient};
    QueuedMessage {
        envelope: Envelope {
            id: QueueId::generate(),
            mail: MailParams {
                from: "sender@a.test".into(),
                ..MailParams::default()
            },
            recipients: vec![Recipient {
                address: "r@b.test".into(),
                notify: None,
                orcpt: None,
            }],
            client: ClientInfo {
                ip: "192.0.2.1".parse().unwrap(),
                port: 1,
                helo: "c.test".into(),
                auth_user: None,
                tls: None,
                listener: "smtp".into(),
            },
            received_at_ms: mailrelay::queue::now_ms(),
            received_by: "relay.test".into(),
        },
        body: format!("Subject: {n}\r\n\r\nhi\r\n").into_bytes(),
    }
}

/// With the queue at hand, the check and the enqueue are one script call: a
/// message is stored if and only if it was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_enqueue_in_one_round_trip() {
    use mailrelay::queue::Inspect;
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let queue = Arc::new(RedisQueue::connect(&server.config("qt")).await.unwrap());
    let store = RedisStore::with_queue(Arc::clone(&queue)).await.unwrap();
    let windows = [WindowSpec::new(3, 3_600_000)];
    let reqs = [
        req("tenant", "sender@a.test", 1, &windows),
        req("all", "*", 1, &[WindowSpec::new(100, 60_000)]),
    ];
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    let mut stored = Vec::new();
    for n in 0..5 {
        let msg = message(n);
        let o = store
            .check_charge_enqueue(&reqs, &msg)
            .expect("standalone Redis checks and enqueues at once")
            .await
            .unwrap();
        assert_eq!(o.allowed, n < 3, "message {n}");
        let in_queue = queue.get(&msg.envelope.id).await.unwrap();
        assert_eq!(in_queue.is_some(), o.allowed, "stored iff charged");
        if o.allowed {
            stored.push(msg.envelope.id.clone());
        } else {
            assert_eq!(o.checks[0][0].used, 3);
            assert_eq!(
                o.checks[1][0].used, 3,
                "the shared quota was not charged either"
            );
        }
    }
    assert_eq!(calls(&server, "evalsha"), 5, "one round trip per message");
    assert_eq!(queue.stats().await.unwrap().messages, 3);
    let u = store
        .usage("all", &["*".into()], &[WindowSpec::new(100, 60_000)], None)
        .await
        .unwrap();
    assert_eq!(u.keys[0][0].used, 3);
}

/// The hash of a key holds the packed state and a field per finished bucket, named
/// as `bucket_field` says; a window nothing counts in any more (its quota left the
/// config) is dropped with its buckets once the key's expiry is next pushed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_buckets_are_fields_and_stale_windows_are_dropped() {
    use mailrelay::quota::ingress::redis::{bucket_field, counter_key};
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = redis_store(&server.config("qt")).await;
    let minute = [WindowSpec::new(100, 60_000)];
    let hour = [WindowSpec::new(100, 3_600_000)];
    let t0 = 1_700_000_040_000u64; // a bucket boundary of both windows
    let both = |at| {
        let reqs = vec![req("old", "k", 1, &minute), req("kept", "k", 1, &hour)];
        (reqs, Some(at))
    };
    for at in [t0, t0 + 1_000, t0 + 2_000] {
        let (reqs, at) = both(at);
        assert!(redis.check_and_charge(&reqs, at).await.unwrap().allowed);
    }
    let key = counter_key("qt", false, "k");
    let fields = |server: &RedisServer| -> Vec<String> {
        let mut f: Vec<String> = server
            .cli(&["HKEYS", &key])
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        f.sort();
        f
    };
    let mut expected = vec![
        bucket_field("old", &minute[0], (t0 / 1_000) as i64),
        bucket_field("old", &minute[0], (t0 / 1_000 + 1) as i64),
        "a".to_owned(),
        "h".to_owned(),
        "k".to_owned(),
    ];
    expected.sort();
    assert_eq!(fields(&server), expected);
    // Two hours on, only the hour quota is still configured; its check pushes the
    // key's expiry out and drops what is left of the minute quota.
    let later = t0 + 2 * 3_600_000;
    let reqs = [req("kept", "k", 1, &hour)];
    let out = redis.check_and_charge(&reqs, Some(later)).await.unwrap();
    assert!(out.allowed);
    assert_eq!(out.checks[0][0].used, 1);
    assert_eq!(fields(&server), ["a", "h", "k"].map(String::from).to_vec());
    let u = redis
        .usage("old", &["k".into()], &minute, Some(later))
        .await
        .unwrap();
    assert_eq!(u.keys[0][0].used, 0);
}

/// A process remembers a key's state from its last full check, so the next checks
/// of the key read and write only its tallies (one number per quota): one `HGET`
/// and one `HSET` inside the script, and the same answers (the model test above
/// covers the answers on both paths). Another process's write is noticed by its
/// version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_keys_are_checked_from_their_tallies_alone() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let a = redis_store(&server.config("qt")).await;
    let b = redis_store(&server.config("qt")).await;
    let windows = [
        WindowSpec::new(1_000, 60_000),
        WindowSpec::new(10_000, 3_600_000),
    ];
    let reqs: Vec<ChargeRequest> = (0..3)
        .map(|i| req(&format!("q{i}"), "k", 1, &windows))
        .collect();
    let at = Some(1_700_000_000_500);
    assert!(a.check_and_charge(&reqs, at).await.unwrap().allowed);
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    for n in 2..=20 {
        let out = a.check_and_charge(&reqs, at).await.unwrap();
        assert!(out.allowed);
        assert!(out.checks.iter().flatten().all(|c| c.used == n), "{out:?}");
    }
    assert_eq!(calls(&server, "hmget"), 0, "the state was read whole");
    assert_eq!(calls(&server, "hget"), 19);
    // Another process charges the key a minute later: a new bucket, so a new
    // version of the slow half. The first process notices and reads it whole.
    let later = Some(1_700_000_061_500);
    assert!(b.check_and_charge(&reqs, later).await.unwrap().allowed);
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    let out = a.check_and_charge(&reqs, later).await.unwrap();
    assert!(
        out.checks.iter().all(|c| c[0].used == 2 && c[1].used == 22),
        "{out:?}"
    );
    assert_eq!(calls(&server, "hmget"), 1, "the new version was read");
    let out = a.check_and_charge(&reqs, later).await.unwrap();
    assert!(
        out.checks.iter().all(|c| c[0].used == 3 && c[1].used == 23),
        "{out:?}"
    );
    assert_eq!(calls(&server, "hmget"), 1, "and remembered");
}
