//! Lease-based leader election against the in-memory API (tower-test transport).

use crate::support;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use mailrelay_operator::leader::{ElectorConfig, LeaderElector};
use serde_json::{Value, json};
use support::fake_api::FakeApi;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/mailrelay-operator";

fn elector(api: &FakeApi, id: &str) -> LeaderElector {
    let mut cfg = ElectorConfig::new("ops", id);
    cfg.renew_every = Duration::from_millis(50);
    cfg.retry_every = Duration::from_millis(50);
    LeaderElector::new(api.client.clone(), cfg)
}

fn holder(api: &FakeApi) -> Value {
    api.get(LEASE).unwrap()["spec"]["holderIdentity"].clone()
}

fn foreign_lease(holder: &str, renewed_secs_ago: i64) -> Value {
    let t = Timestamp::from_second(Timestamp::now().as_second() - renewed_secs_ago).unwrap();
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "mailrelay-operator", "namespace": "ops"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                    "renewTime": t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 3}})
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_others_wait() {
    let api = FakeApi::start();
    let a = elector(&api, "operator-a");
    let b = elector(&api, "operator-b");
    assert!(a.try_lead().await.unwrap());
    assert_eq!(holder(&api), "operator-a");
    assert!(api.requests().iter().any(|r| r.is("POST", "/leases")));

    api.clear_requests();
    assert!(
        !b.try_lead().await.unwrap(),
        "a valid lease of another replica"
    );
    assert!(
        api.requests().iter().all(|r| r.method == "GET"),
        "a follower writes nothing"
    );

    let before = api.get(LEASE).unwrap()["spec"]["renewTime"].clone();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(a.try_lead().await.unwrap(), "the leader renews");
    assert_ne!(api.get(LEASE).unwrap()["spec"]["renewTime"], before);
    assert_eq!(holder(&api), "operator-a");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_a_fresh_one_is_not() {
    let api = FakeApi::start();
    api.put(LEASE, foreign_lease("dead-operator", 5));
    let b = elector(&api, "operator-b");
    assert!(!b.try_lead().await.unwrap());
    api.put(LEASE, foreign_lease("dead-operator", 60));
    assert!(b.try_lead().await.unwrap());
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "operator-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 4);
}

#[tokio::test]
async fn of_two_racing_replicas_one_wins() {
    let api = FakeApi::start();
    api.put(LEASE, foreign_lease("dead-operator", 60));
    let b = elector(&api, "operator-b");
    // Someone else wrote the Lease between our read and our write.
    api.fail_next("PUT", "/leases/mailrelay-operator", 409);
    assert!(
        !b.try_lead().await.unwrap(),
        "a conflict means we lost the race"
    );
    api.fail_next("POST", "/leases", 500);
    api.remove(LEASE);
    assert!(b.try_lead().await.is_err(), "other errors are errors");
}

#[tokio::test]
async fn release_hands_over_at_once_and_hold_ends_when_the_lease_is_lost() {
    let api = FakeApi::start();
    let a = elector(&api, "operator-a");
    let b = elector(&api, "operator-b");
    a.acquire().await;
    a.release().await;
    assert_eq!(holder(&api), Value::Null);
    tokio::time::timeout(Duration::from_secs(10), b.acquire())
        .await
        .expect("a released lease is free at once");
    assert_eq!(holder(&api), "operator-b");

    let api2 = api.clone();
    let holding = tokio::spawn(async move { b.hold().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!holding.is_finished(), "renewing keeps leadership");
    // Another replica took the Lease (say our renewals were lost): step down.
    api2.put(LEASE, foreign_lease("operator-c", 0));
    tokio::time::timeout(Duration::from_secs(10), holding)
        .await
        .expect("hold returns once another replica holds the lease")
        .unwrap();
}
