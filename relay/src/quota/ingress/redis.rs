//! Quota counters in Redis, shared by every relay process on the same Redis: the
//! sliding window of [`super::window`], in Lua.
//!
//! # One round trip per message
//!
//! [`CHARGE_LUA`] checks every window of every quota a message falls under and, only
//! if all fit, charges them all: one `EVALSHA`, atomic, whatever the number of
//! quotas. With a standalone Redis it runs inside the queue's enqueue script
//! ([`RedisStore::with_queue`]): checking, charging and storing a message is then
//! one round trip, the same as storing it without quotas, and a message is charged
//! if and only if it is stored. (In Redis Cluster the counters and the message are
//! in different slots: the check is its own round trip before the enqueue.)
//!
//! The clock is Redis `TIME`, so relays with skewed clocks still share one window.
//! Plain Redis (no modules), 5.0 or later (scripts that read `TIME` before writing
//! need effects replication, the default since 5.0).
//!
//! # Keys
//!
//! A quota key's counters (a sender, an AUTH user, `*` for shared quotas) carry the
//! hash tag of its *bucket*: one of 64 tags `{<prefix>:q:<b>.<n>}`, one per equal
//! share of Redis Cluster's slot range ([`crate::redis_conn::slots`]), picked by a
//! hash of the key, on a Redis Cluster. On a standalone Redis (or Sentinel) there is
//! nothing to spread: `B` is `mr:quota`, one tag, the layout of the versions before.
//! With `key_prefix: mr` and `B` a bucket's tag:
//!
//! | key                      | type       | content                                              |
//! |--------------------------|------------|------------------------------------------------------|
//! | `mr:{B}:c:<key>`         | hash       | every counter of one key, see below                   |
//! | `mr:{B}:keys`            | sorted set | the bucket's keys, scored by when their counters all go stale (for the usage API) |
//!
//! A key's hash holds its state in three fields of little-endian doubles (see
//! `lua/common.lua`): `k`, one record per quota window of what changes at most once
//! a bucket (the window's tag, [`window_tag`], a hash of the quota's name and
//! window; its window and bucket length; when its lowest bucket kept stops
//! counting and when its latest bucket ends; its quota's id, [`quota_id`]); `h`,
//! per window the total counted and the units in the latest bucket; `a`, a version
//! of `k` and `h` and per quota a tally of what was charged to all its windows
//! since. Each older bucket that still holds units is a field of its own,
//! `<tag>:<bucket index>` ([`bucket_field`]).
//!
//! # Checking by tallies
//!
//! Redis' Lua is slow per instruction and per value moved (tens of machine
//! instructions per VM step, hundreds per number through `struct`), so the cost of
//! a quota is the work per window per check. A relay remembers `k` and `h` of each
//! key it charged (from the reply) and, until a window of the key needs a new
//! bucket or an old one dropped, checks the key by its tallies: it sends, per
//! quota, how many units still fit (the tightest window's limit minus its
//! remembered total), and the script reads and writes only `a`, one number per
//! quota, after checking its version. Everything else (a key not remembered, a
//! version moved on by another relay or a refund, a bucket boundary) reads the
//! state whole, adds the tallies into `h` and works per window, as the model in
//! [`super::window`] does; the answers are the same either way (tested against the
//! model on random sequences).
//!
//! All quotas of one key share a hash, so checking ten quotas of a sender is a
//! handful of hash commands, not ten times that.
//!
//! # Redis Cluster: a slot per bucket
//!
//! Different keys' counters spread over all masters, so many senders do not all
//! count on one. A check whose keys share a bucket (one key, the common case) is one
//! script, atomic as ever. A check of keys in different buckets (a sender's quota
//! and an AUTH user's, or a shared quota's `*`) is one script per bucket, all sent
//! at once (one round trip of latency); the message is allowed only if all allow,
//! and the buckets that charged are refunded when one refused (a second round
//! trip, only then). What that gives up: until the refund, another check can see
//! the charge and refuse (it errs strict, never lets more through), and the
//! refused check reports the refunded windows as they were with the charge. The
//! layout before put every quota key in one slot (`{<prefix>:quota}`): atomic for
//! any mix of keys, and every check of every relay on one master. A standalone
//! Redis (or Sentinel) still checks every key in one script, inside the enqueue.
//! The usage API reads every bucket's index by name (no `SCAN`).
//!
//! A hash expires by itself a little over one window plus one bucket (of its
//! longest window) after its last charge, when every bucket has stopped counting;
//! index entries are dropped once stale, and the index expires like the
//! longest-lived hash. Expiry and index are refreshed only when the time they are
//! good until (kept in the state) comes within a window of now, about sixteen times
//! per window, not on every charge. The state of a window nothing counts in any
//! more (a quota removed from the config, or one the key no longer falls under) is
//! dropped, with its older buckets, the next time the key is charged.
//!
//! Counters written by versions before this layout (a field per quota window) are
//! not read: upgrading starts every window afresh. On a cluster, counters of the
//! one-slot layout before (everything under `{<prefix>:quota}`) are not read or
//! migrated either: a rolling upgrade starts every window afresh (old and new
//! relays count apart until the roll ends), and the old keys expire by themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::Script;

use super::store::{
    ChargeOutcome, ChargeRequest, CounterStore, CounterUsage, MAX_KEYS_SCANNED, StoreError,
    StoreFuture, UsageReport,
};
use super::window::{WindowCheck, WindowSpec};
use crate::queue::QueuedMessage;
use crate::queue::redis::{EnqueueGuard, RedisQueue, SharedRedis};
use crate::redis_conn::script::{Call, Layout};
use crate::redis_conn::slots;

// The scripts, one file each in `lua/`, put together at load time (no code is
// generated): a script that runs alone starts with `args.lua` (its arguments at
// `ARGV[1]`), then `doubles.lua` (`DS`, a struct format of [`FORMAT_DOUBLES`]
// doubles) and `common.lua` (the clock and the helpers), then its own file.
//
// Costs in this interpreter (Redis' Lua 5.1 with its hooks) are what shaped the
// scripts: a VM instruction is tens of machine instructions, each value through
// `struct` a few hundred, a table that grows rehashes. So a window's state is one
// record in one packed string per key, the common path of a window is a handful of
// instructions on that record in place, and the reply reuses the packed state.

/// `local A0 = 0`: the script's own arguments start at `ARGV[1]`.
const ARGS_LUA: &str = include_str!("lua/args.lua");
/// `DS`, the struct format of [`FORMAT_DOUBLES`] doubles.
const DOUBLES_LUA: &str = include_str!("lua/doubles.lua");
/// The clock (`now`, from `ARGV[A0 + 1]` or Redis `TIME`), the packed state and
/// the helpers every script shares.
const COMMON_LUA: &str = include_str!("lua/common.lua");
/// Check and charge, as `local function guard(K0)` returning `allowed, reply`
/// (its keys from `KEYS[K0 + 1]`, its arguments from `ARGV[A0 + 1]`), so that it
/// can run alone ([`CHARGE_MAIN_LUA`]) or before an enqueue in the same call: see
/// [`RedisStore`]. The Rust twin is [`super::window::WindowState`].
pub const CHARGE_LUA: &str = include_str!("lua/charge.lua");
/// Runs the check alone and returns its reply.
const CHARGE_MAIN_LUA: &str = include_str!("lua/charge_main.lua");
const REFUND_LUA: &str = include_str!("lua/refund.lua");
const USAGE_LUA: &str = include_str!("lua/usage.lua");
const ACTIVE_LUA: &str = include_str!("lua/active.lua");

/// KEYS/ARGV of the check (`charge.lua`): `F`, `N` and `S` are lists of doubles,
/// each as its struct format and its bytes. Alone, it starts at `KEYS[1]` and
/// `ARGV[1]`; as an enqueue's guard, after the enqueue's.
const CHARGE: Layout = Layout {
    keys: &["counter hashes..", "key index"],
    args: &[
        "now",
        "F format",
        "F",
        "N format",
        "N",
        "S format",
        "S",
        "key index members..",
    ],
};
/// One request's part of `refund.lua`'s arguments: cost, window count, then
/// per window its tag.
const PER_REQUEST: &str = "per request..";
/// KEYS/ARGV of `refund.lua`.
const REFUND: Layout = Layout {
    keys: &["counter hashes.."],
    args: &["charge time", PER_REQUEST],
};
/// KEYS/ARGV of `usage.lua`.
const USAGE: Layout = Layout {
    keys: &["counter hashes.."],
    args: &["now", "window count", "window tags.."],
};
/// KEYS/ARGV of `active.lua`.
const ACTIVE: Layout = Layout {
    keys: &["key index"],
    args: &["now", "counter hash prefix", "window tag", "most keys"],
};

/// The check as the guard of an enqueue (the queue puts `A0` in front).
fn guard_lua() -> String {
    [DOUBLES_LUA, COMMON_LUA, CHARGE_LUA].concat()
}

/// A script that runs alone: its arguments start at `ARGV[1]`.
fn standalone_lua(body: &[&str]) -> String {
    [&[ARGS_LUA, DOUBLES_LUA, COMMON_LUA][..], body]
        .concat()
        .concat()
}

/// Every script as Redis runs it, by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    vec![
        (
            "quota_charge",
            standalone_lua(&[CHARGE_LUA, CHARGE_MAIN_LUA]),
        ),
        ("quota_refund", standalone_lua(&[REFUND_LUA])),
        ("quota_usage", standalone_lua(&[USAGE_LUA])),
        ("quota_active", standalone_lua(&[ACTIVE_LUA])),
        (
            "quota_guarded_enqueue",
            crate::queue::redis::guarded_enqueue_lua(&guard_lua()),
        ),
    ]
}

/// Doubles one struct format in the scripts covers (`DS` of `doubles.lua`).
const FORMAT_DOUBLES: usize = 4000;

/// Quota windows one check may cover: the script unpacks its numbers (two per
/// window, plus two per request) and packs its reply (three per window) in one C
/// call each, bounded by `FORMAT_DOUBLES` and by Lua's C stack (8000 values).
pub const MAX_WINDOWS_PER_CHECK: usize = 1000;
// The reply's three numbers per window fit one struct format of `DS`.
const _: () = assert!(3 * MAX_WINDOWS_PER_CHECK <= FORMAT_DOUBLES);

/// The key prefixes of the quota keys: on a cluster `<prefix>:{<prefix>:q:<b>.<n>}:`,
/// one per bucket ([`slots::bucket_prefixes`]); on a standalone Redis (nothing to
/// spread) the one prefix of the versions before, `<prefix>:{<prefix>:quota}:`.
pub fn bucket_prefixes(prefix: &str, cluster: bool) -> Vec<String> {
    if cluster {
        slots::bucket_prefixes(prefix, "q")
    } else {
        vec![format!("{prefix}:{{{prefix}:quota}}:")]
    }
}

fn bucket_of(buckets: &[String], key: &str) -> usize {
    slots::bucket_of(key) % buckets.len()
}

/// The counter hash of one key (every quota and window of it), in the key's bucket.
pub fn counter_key(prefix: &str, cluster: bool, key: &str) -> String {
    let b = bucket_prefixes(prefix, cluster);
    format!("{}c:{key}", b[bucket_of(&b, key)])
}

/// The tag of a quota window in Redis: FNV-1a of the quota's name, window and bucket
/// length, cut to 46 bits so that Lua (whose numbers are doubles, printed with 14
/// digits) holds it and prints it exactly. With a thousand quota windows, the chance
/// that two share a tag is below one in ten million.
pub fn window_tag(quota: &str, w: &WindowSpec) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (window, bucket) = (w.window_ms.to_le_bytes(), w.bucket_ms.to_le_bytes());
    let bytes = quota
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(&window)
        .chain(&bucket);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 46) - 1)
}

/// The id of a quota in Redis (its windows' tallies are kept under it): FNV-1a of
/// its name, cut to 46 bits like [`window_tag`].
pub fn quota_id(quota: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in quota.as_bytes().iter().chain(&[0xfe]) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 46) - 1)
}

/// The field of one older bucket of a quota window in a key's hash.
pub fn bucket_field(quota: &str, w: &WindowSpec, bucket: i64) -> String {
    format!("{}:{bucket}", window_tag(quota, w))
}

/// The index of the keys in `key`'s bucket.
pub fn index_key(prefix: &str, cluster: bool, key: &str) -> String {
    let b = bucket_prefixes(prefix, cluster);
    format!("{}keys", b[bucket_of(&b, key)])
}

/// The counters in Redis. With the queue at hand ([`RedisStore::with_queue`], a
/// standalone Redis), a message's check and its enqueue are one atomic script call:
/// one round trip per message, and a message is charged if and only if it is stored.
pub struct RedisStore {
    redis: SharedRedis,
    charge: Script,
    refund: Script,
    usage: Script,
    active: Script,
    queue: Option<(Arc<RedisQueue>, EnqueueGuard)>,
    /// [`bucket_prefixes`], computed once.
    buckets: Vec<String>,
    /// The `k` of keys this process charged lately, by counter hash: what lets a
    /// check skip reading and unpacking it (see [`CHARGE_LUA`]).
    remembered: Mutex<Memory>,
}

/// A key's `k` and `h` as last written, and their version: what a check of the key
/// by its tallies alone is reckoned against.
#[derive(Debug, Clone)]
struct Remembered {
    version: f64,
    /// The time the key's expiry is good until.
    sure: f64,
    /// Per window: tag, window ms, bucket ms, when its lowest bucket stops counting,
    /// when its latest bucket ends, quota id.
    records: Vec<[f64; STATE_RECORD]>,
    /// Per window: total counted, units in its latest bucket.
    totals: Vec<[f64; STATE_HOT]>,
}

impl Remembered {
    /// The place of a quota among the key's tallies: quotas in order of their
    /// first window (as the script counts them).
    fn slot(&self, qid: f64) -> Option<usize> {
        let mut seen: Vec<f64> = Vec::new();
        for r in &self.records {
            if r[5] == qid {
                return Some(seen.len());
            }
            if !seen.contains(&r[5]) {
                seen.push(r[5]);
            }
        }
        None
    }
}

/// Keys remembered per generation (see [`Memory`]); a check of a key not remembered
/// is only slower.
const REMEMBERED_MAX: usize = 10_000;

/// The remembered keys, in two generations: when the newer one is full it becomes
/// the older and the older is dropped. Dropping everything at once (as before)
/// forgot every key just when a set of senders about the size of the memory came
/// round again: with 10,000 senders each sending in turn, no check ever found its
/// key remembered. Now a key charged within the last `REMEMBERED_MAX` to
/// `2 × REMEMBERED_MAX` keys is still there.
#[derive(Default)]
struct Memory {
    new: HashMap<String, Remembered>,
    old: HashMap<String, Remembered>,
}

impl Memory {
    fn get(&self, key: &str) -> Option<&Remembered> {
        self.new.get(key).or_else(|| self.old.get(key))
    }

    fn insert(&mut self, key: String, m: Remembered) {
        if self.new.len() >= REMEMBERED_MAX && !self.new.contains_key(&key) {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert(key, m);
    }

    /// Keeps a key checked by its tallies (whose state did not change) in the
    /// newer generation.
    fn touch(&mut self, key: &str) {
        if !self.new.contains_key(key)
            && let Some(m) = self.old.remove(key)
        {
            self.insert(key.to_owned(), m);
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: String) -> StoreError {
    StoreError::Unavailable(e)
}

impl RedisStore {
    /// Uses the queue's connection; loads the scripts so that the first check is
    /// already a single round trip.
    pub async fn new(redis: SharedRedis) -> Result<Self, StoreError> {
        let script = |body: &[&str]| Script::new(&standalone_lua(body));
        let store = RedisStore {
            charge: script(&[CHARGE_LUA, CHARGE_MAIN_LUA]),
            refund: script(&[REFUND_LUA]),
            usage: script(&[USAGE_LUA]),
            active: script(&[ACTIVE_LUA]),
            buckets: bucket_prefixes(redis.prefix(), redis.is_cluster()),
            redis,
            queue: None,
            remembered: Mutex::new(Memory::default()),
        };
        for s in [&store.charge, &store.refund, &store.usage, &store.active] {
            store.redis.load(s).await.map_err(unavailable)?;
        }
        Ok(store)
    }

    /// [`RedisStore::new`] on `queue`'s connection, checking and enqueueing a
    /// message in one call where Redis allows it (not in Redis Cluster, where the
    /// counters and the message live in different slots: there the check is its own
    /// round trip before the enqueue).
    pub async fn with_queue(queue: Arc<RedisQueue>) -> Result<Self, StoreError> {
        let mut store = Self::new(queue.shared()).await?;
        let guard = queue
            .enqueue_guard(&guard_lua())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        store.queue = guard.map(|g| (queue, g));
        Ok(store)
    }

    /// The prefix of `key`'s bucket.
    fn bucket(&self, key: &str) -> &str {
        &self.buckets[bucket_of(&self.buckets, key)]
    }

    fn counter_key(&self, key: &str) -> String {
        format!("{}c:{key}", self.bucket(key))
    }

    /// The calls a request list takes: one on a standalone Redis; on a cluster one
    /// per bucket its keys fall in (indexes into `reqs`, in order).
    fn parts(&self, keys: impl Iterator<Item = impl AsRef<str>>) -> Vec<Vec<usize>> {
        let mut parts: Vec<(usize, Vec<usize>)> = Vec::new();
        let cluster = self.redis.is_cluster();
        for (i, k) in keys.enumerate() {
            let b = if cluster {
                bucket_of(&self.buckets, k.as_ref())
            } else {
                0
            };
            match parts.iter_mut().find(|p| p.0 == b) {
                Some(p) => p.1.push(i),
                None => parts.push((b, vec![i])),
            }
        }
        parts.into_iter().map(|p| p.1).collect()
    }

    /// Checks and charges `reqs` (all in one slot, or a standalone Redis): one
    /// script, all or nothing.
    async fn charge_one(
        &self,
        reqs: &[ChargeRequest],
        at: Option<u64>,
    ) -> Result<ChargeOutcome, StoreError> {
        let call = self.charge_call(reqs, at)?;
        let mut named = Call::new(&self.charge, &CHARGE);
        let (counters, index) = call.keys.split_at(call.keys.len() - 1);
        for k in counters {
            named.key("counter hashes..", k);
        }
        named.key("key index", &index[0]);
        let (lists, members) = call.args.split_at(CHARGE.fixed_args());
        for (name, a) in CHARGE.args.iter().zip(lists) {
            named.arg(name, a.as_slice());
        }
        for m in members {
            named.arg("key index members..", m.as_slice());
        }
        let inv = named.invocation();
        let blob: Vec<u8> = self.redis.invoke(&inv).await.map_err(unavailable)?;
        let parsed = parse_outcome(reqs, &call, &blob)?;
        self.remember(&call, &parsed);
        Ok(parsed.outcome)
    }

    async fn refund_one(&self, reqs: &[ChargeRequest], charged_at: u64) -> Result<(), StoreError> {
        let mut call = Call::new(&self.refund, &REFUND);
        call.arg("charge time", charged_at);
        for r in reqs {
            call.key("counter hashes..", self.counter_key(&r.key))
                .arg(PER_REQUEST, r.cost)
                .arg(PER_REQUEST, r.windows.len());
            for w in &r.windows {
                call.arg(PER_REQUEST, window_tag(&r.quota, w));
            }
        }
        let inv = call.invocation();
        let _: i64 = self.redis.invoke(&inv).await.map_err(unavailable)?;
        Ok(())
    }
}

fn at_arg(at: Option<u64>) -> String {
    at.map_or_else(String::new, |t| t.to_string())
}

fn int(v: &redis::Value) -> Result<i64, StoreError> {
    match v {
        redis::Value::Int(i) => Ok(*i),
        other => Err(StoreError::Corrupt(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

/// Requests grouped by key, in order of first appearance: `(key, indexes into the
/// requests)`.
fn groups(reqs: &[ChargeRequest]) -> Vec<(&str, Vec<usize>)> {
    let mut out: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, r) in reqs.iter().enumerate() {
        match at.get(r.key.as_str()) {
            Some(&g) => out[g].1.push(i),
            None => {
                at.insert(&r.key, out.len());
                out.push((&r.key, vec![i]));
            }
        }
    }
    out
}

/// A list of numbers for a script, as little-endian doubles (one C call unpacks
/// them all, where text would cost a conversion each).
struct Doubles {
    bytes: Vec<u8>,
}

impl Doubles {
    fn with_capacity(n: usize) -> Self {
        Doubles {
            bytes: Vec::with_capacity(8 * n),
        }
    }

    fn put(&mut self, v: u64) {
        self.put_f64(v as f64);
    }

    fn put_f64(&mut self, v: f64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    /// Its struct format: `<` and a `d` per number.
    fn format(&self) -> String {
        format!("<{}", "d".repeat(self.bytes.len() / 8))
    }
}

/// The keys and arguments of one check (see [`CHARGE_LUA`]).
struct ChargeCall<'r> {
    groups: Vec<(&'r str, Vec<usize>)>,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    /// Per group checked by its tallies: per window, its remembered total and its
    /// quota's place among the tallies.
    remembered: Vec<Option<Vec<(f64, usize)>>>,
}

impl RedisStore {
    fn charge_call<'r>(
        &self,
        reqs: &'r [ChargeRequest],
        at: Option<u64>,
    ) -> Result<ChargeCall<'r>, StoreError> {
        let windows: usize = reqs.iter().map(|r| r.windows.len()).sum();
        if windows > MAX_WINDOWS_PER_CHECK {
            return Err(StoreError::Unavailable(format!(
                "one message falls under {windows} quota windows; at most {MAX_WINDOWS_PER_CHECK} can be checked at once"
            )));
        }
        let groups = groups(reqs);
        let mut fast = Doubles::with_capacity(1 + 4 * groups.len() + 3 * reqs.len());
        let mut num = Doubles::with_capacity(2 * groups.len() + 3 * reqs.len() + 2 * windows);
        let mut shapes = Doubles::with_capacity(2 * windows);
        fast.put(groups.len() as u64);
        let mut keys = Vec::with_capacity(groups.len() + 1);
        let mut members: Vec<Vec<u8>> = Vec::with_capacity(groups.len());
        let mut remembered = Vec::with_capacity(groups.len());
        let memory = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        for (key, group) in &groups {
            let ttl = group
                .iter()
                .map(|&i| reqs[i].index_ttl_ms())
                .max()
                .unwrap_or(1);
            let counter = self.counter_key(key);
            let plan = memory
                .get(&counter)
                .and_then(|m| tally_plan(m, group.iter().map(|&i| &reqs[i]), ttl));
            match &plan {
                Some(plan) => {
                    fast.put_f64(plan.version);
                    fast.put_f64(plan.from);
                    fast.put_f64(plan.until);
                    fast.put(group.len() as u64);
                    for (&i, &(slot, headroom)) in group.iter().zip(&plan.requests) {
                        fast.put(reqs[i].cost);
                        fast.put(slot as u64);
                        fast.put_f64(headroom);
                    }
                }
                None => {
                    for _ in 0..3 {
                        fast.put(0);
                    }
                    fast.put(group.len() as u64);
                    for _ in 0..3 * group.len() {
                        fast.put(0);
                    }
                }
            }
            num.put(ttl);
            num.put(group.len() as u64);
            keys.push(counter);
            members.push(key.as_bytes().to_vec());
            for &i in group {
                let r = &reqs[i];
                num.put(r.cost);
                num.put(quota_id(&r.quota));
                num.put(r.windows.len() as u64);
                for w in &r.windows {
                    num.put(window_tag(&r.quota, w));
                    num.put(w.limit);
                    shapes.put(w.window_ms);
                    shapes.put(w.bucket_ms);
                }
            }
            remembered.push(plan.map(|p| p.windows));
        }
        drop(memory);
        // All of `reqs` share a bucket here (see `parts`), or Redis is standalone.
        keys.push(format!(
            "{}keys",
            self.bucket(reqs.first().map_or("", |r| r.key.as_str()))
        ));
        let mut args = Vec::with_capacity(CHARGE.fixed_args() + members.len());
        args.push(at_arg(at).into_bytes());
        for list in [fast, num, shapes] {
            args.push(list.format().into_bytes());
            args.push(list.bytes);
        }
        args.extend(members);
        Ok(ChargeCall {
            groups,
            keys,
            args,
            remembered,
        })
    }

    /// Remembers the `k` of the keys a check returned.
    fn remember(&self, call: &ChargeCall<'_>, outcome: &Parsed) {
        if outcome.states.is_empty() {
            return;
        }
        let mut memory = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        for (g, state) in outcome.states.iter().enumerate() {
            match state {
                Some(m) => memory.insert(call.keys[g].clone(), m.clone()),
                None => memory.touch(&call.keys[g]),
            }
        }
    }
}

/// How a check of one key's requests goes by its tallies alone (see [`CHARGE_LUA`]).
struct TallyPlan {
    version: f64,
    /// From and until when (Redis clock) the check needs no change to `k`: no bucket
    /// to start or drop, no expiry to push.
    from: f64,
    until: f64,
    /// Per request: its quota's place among the tallies, and the units it may
    /// still charge (its tightest window's limit minus that window's remembered
    /// total).
    requests: Vec<(usize, f64)>,
    /// Per window: its remembered total and its quota's place.
    windows: Vec<(f64, usize)>,
}

/// Whether a check of `reqs` (one key's) can go by the key's remembered state: each
/// request's quota has records for exactly its windows (so its tally is theirs).
fn tally_plan<'r>(
    m: &Remembered,
    reqs: impl Iterator<Item = &'r ChargeRequest>,
    ttl: u64,
) -> Option<TallyPlan> {
    let (mut from, mut until) = (0f64, m.sure - ttl as f64);
    let mut requests = Vec::new();
    let mut windows = Vec::new();
    for r in reqs {
        let qid = quota_id(&r.quota) as f64;
        let slot = m.slot(qid)?;
        if m.records.iter().filter(|rec| rec[5] == qid).count() != r.windows.len() {
            return None;
        }
        let mut headroom = f64::INFINITY;
        for w in &r.windows {
            let tag = window_tag(&r.quota, w) as f64;
            let rec = m.records.iter().position(|rec| rec[0] == tag)?;
            let [_, _, b, lowest_stops, latest_ends, q] = m.records[rec];
            if q != qid {
                return None;
            }
            let total = m.totals[rec][0];
            from = from.max(latest_ends - b);
            until = until.min(lowest_stops).min(latest_ends);
            headroom = headroom.min(w.limit as f64 - total);
            windows.push((total, slot));
        }
        requests.push((slot, headroom));
    }
    (from < until).then_some(TallyPlan {
        version: m.version,
        from,
        until,
        requests,
        windows,
    })
}

/// A check's reply: the outcome, and per group the `k` it returned (to remember).
struct Parsed {
    outcome: ChargeOutcome,
    states: Vec<Option<Remembered>>,
}

/// Reads the packed reply of [`CHARGE_LUA`] back into request order.
fn parse_outcome(
    reqs: &[ChargeRequest],
    call: &ChargeCall<'_>,
    blob: &[u8],
) -> Result<Parsed, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("charge reply: {what}"));
    if !blob.len().is_multiple_of(8) || blob.len() < 16 {
        return Err(corrupt(format!("{} bytes", blob.len())));
    }
    let vals: Vec<f64> = blob
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let int = |v: f64| v as i64;
    let mut checks = vec![Vec::new(); reqs.len()];
    match vals[0] as i64 {
        // Detailed: allowed, now, then used, retry_at, free_at per window.
        1 => {
            let windows: usize = reqs.iter().map(|r| r.windows.len()).sum();
            if vals.len() != 3 + 3 * windows {
                return Err(corrupt(format!(
                    "{} values for {windows} windows",
                    vals.len()
                )));
            }
            let mut it = vals[3..].chunks_exact(3);
            for (_, members) in &call.groups {
                for &i in members {
                    for _ in &reqs[i].windows {
                        let c = it.next().expect("length checked");
                        let retry = int(c[1]);
                        checks[i].push(WindowCheck {
                            used: int(c[0]).max(0) as u64,
                            retry_at: (retry >= 0).then_some(retry as u64),
                            free_at: int(c[2]).max(0) as u64,
                        });
                    }
                }
            }
            let outcome = ChargeOutcome {
                allowed: int(vals[1]) == 1,
                now: int(vals[2]).max(0) as u64,
                checks,
            };
            Ok(Parsed {
                outcome,
                states: Vec::new(),
            })
        }
        // All fit with a unit to spare: now, then each group's `k`, `h` (none when
        // checked by its tallies) and `a`.
        2 => {
            let mut at = 2;
            let mut states = Vec::with_capacity(call.groups.len());
            for (g, (_, members)) in call.groups.iter().enumerate() {
                let (nk, nh, na) = match vals.get(at..at + 3) {
                    Some([k, h, a]) => (*k as usize, *h as usize, *a as usize),
                    _ => return Err(corrupt(format!("no state lengths at {at}"))),
                };
                let start = at + 3;
                let (Some(k), Some(h), Some(a)) = (
                    vals.get(start..start + nk),
                    vals.get(start + nk..start + nk + nh),
                    vals.get(start + nk + nh..start + nk + nh + na),
                ) else {
                    return Err(corrupt(format!(
                        "state of {nk} + {nh} + {na} values at {at}"
                    )));
                };
                at = start + nk + nh + na;
                let tally = |slot: usize| a.get(1 + slot).copied().unwrap_or(0.0);
                if nk == 0 {
                    let plan = call.remembered[g]
                        .as_ref()
                        .ok_or_else(|| corrupt("no state of a key not remembered".into()))?;
                    let mut windows = plan.iter();
                    for &i in members {
                        for _ in &reqs[i].windows {
                            let &(total, slot) =
                                windows.next().ok_or_else(|| corrupt("windows".into()))?;
                            push_fitting(&mut checks, i, total + tally(slot));
                        }
                    }
                    states.push(None);
                    continue;
                }
                let records = (nk - 1) / STATE_RECORD;
                if (nk - 1) % STATE_RECORD != 0 || nh != STATE_HOT * records || na == 0 {
                    return Err(corrupt(format!("state of {nk} + {nh} + {na} values")));
                }
                let m = Remembered {
                    version: a[0],
                    sure: k[0],
                    records: k[1..]
                        .chunks_exact(STATE_RECORD)
                        .map(|c| c.try_into().expect("record length"))
                        .collect(),
                    totals: h
                        .chunks_exact(STATE_HOT)
                        .map(|c| c.try_into().expect("totals length"))
                        .collect(),
                };
                for &i in members {
                    let r = &reqs[i];
                    let slot = m.slot(quota_id(&r.quota) as f64);
                    for w in &r.windows {
                        let tag = window_tag(&r.quota, w) as f64;
                        let rec = m
                            .records
                            .iter()
                            .position(|rec| rec[0] == tag)
                            .ok_or_else(|| corrupt(format!("no record of quota {}", r.quota)))?;
                        let total = m.totals[rec][0] + slot.map_or(0.0, tally);
                        push_fitting(&mut checks, i, total);
                    }
                }
                states.push(Some(m));
            }
            if at != vals.len() {
                return Err(corrupt(format!("{} values, read {at}", vals.len())));
            }
            let outcome = ChargeOutcome {
                allowed: true,
                now: int(vals[1]).max(0) as u64,
                checks,
            };
            Ok(Parsed { outcome, states })
        }
        other => Err(corrupt(format!("kind {other}"))),
    }
}

/// A window that fit, with a unit to spare: `used` units.
fn push_fitting(checks: &mut [Vec<WindowCheck>], i: usize, used: f64) {
    checks[i].push(WindowCheck {
        used: (used as i64).max(0) as u64,
        retry_at: Some(0),
        free_at: 0,
    });
}

/// Doubles per window in a key's state: its record in `k` and its totals in `h`
/// (see [`COMMON_LUA`]).
const STATE_RECORD: usize = 6;
const STATE_HOT: usize = 2;

impl CounterStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn check_and_charge<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        at: Option<u64>,
    ) -> StoreFuture<'a, ChargeOutcome> {
        Box::pin(async move {
            let parts = self.parts(reqs.iter().map(|r| r.key.as_str()));
            if parts.len() == 1 {
                return self.charge_one(reqs, at).await;
            }
            // Redis Cluster, keys in several buckets: one script per bucket, all
            // at once; what one charged is refunded when another refused.
            let subs: Vec<Vec<ChargeRequest>> = parts
                .iter()
                .map(|p| p.iter().map(|&i| reqs[i].clone()).collect())
                .collect();
            let outs =
                futures_util::future::join_all(subs.iter().map(|s| self.charge_one(s, at))).await;
            let allowed = outs.iter().all(|o| o.as_ref().is_ok_and(|o| o.allowed));
            if !allowed {
                for (sub, out) in subs.iter().zip(&outs) {
                    if let Ok(o) = out
                        && o.allowed
                    {
                        self.refund_one(sub, o.now).await?;
                    }
                }
            }
            let mut checks = vec![Vec::new(); reqs.len()];
            let mut now = 0;
            for (part, out) in parts.iter().zip(outs) {
                let out = out?;
                now = now.max(out.now);
                for (&i, c) in part.iter().zip(out.checks) {
                    checks[i] = c;
                }
            }
            Ok(ChargeOutcome {
                allowed,
                now,
                checks,
            })
        })
    }

    fn check_charge_enqueue<'a>(
        &'a self,
        reqs: &'a [ChargeRequest],
        msg: &'a QueuedMessage,
    ) -> Option<StoreFuture<'a, ChargeOutcome>> {
        let (queue, guard) = self.queue.as_ref()?;
        Some(Box::pin(async move {
            let call = self.charge_call(reqs, None)?;
            let (_, blob) = queue
                .enqueue_guarded(msg, guard, &call.keys, &call.args)
                .await
                .map_err(|e| match e {
                    crate::queue::QueueError::Full(m) => StoreError::Full(m),
                    e => StoreError::Unavailable(e.to_string()),
                })?;
            let parsed = parse_outcome(reqs, &call, &blob)?;
            self.remember(&call, &parsed);
            Ok(parsed.outcome)
        }))
    }

    fn refund<'a>(&'a self, reqs: &'a [ChargeRequest], charged_at: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            for part in self.parts(reqs.iter().map(|r| r.key.as_str())) {
                let sub: Vec<ChargeRequest> = part.iter().map(|&i| reqs[i].clone()).collect();
                self.refund_one(&sub, charged_at).await?;
            }
            Ok(())
        })
    }

    fn usage<'a>(
        &'a self,
        quota: &'a str,
        keys: &'a [String],
        windows: &'a [WindowSpec],
        at: Option<u64>,
    ) -> StoreFuture<'a, UsageReport> {
        Box::pin(async move {
            let mut now = 0;
            let mut out = vec![Vec::new(); keys.len()];
            for part in self.parts(keys.iter()) {
                let mut call = Call::new(&self.usage, &USAGE);
                call.arg("now", at_arg(at))
                    .arg("window count", windows.len());
                for w in windows {
                    call.arg("window tags..", window_tag(quota, w));
                }
                for &i in &part {
                    call.key("counter hashes..", self.counter_key(&keys[i]));
                }
                let inv = call.invocation();
                let flat: Vec<i64> = self.redis.invoke(&inv).await.map_err(unavailable)?;
                if flat.len() != 1 + 2 * part.len() * windows.len() {
                    return Err(StoreError::Corrupt(format!(
                        "usage reply has {} fields",
                        flat.len()
                    )));
                }
                now = now.max(flat[0].max(0) as u64);
                let mut vals = flat[1..].chunks(2).map(|c| CounterUsage {
                    used: c[0].max(0) as u64,
                    resets_at: c[1].max(0) as u64,
                });
                for &i in &part {
                    out[i] = vals.by_ref().take(windows.len()).collect();
                }
            }
            Ok(UsageReport { now, keys: out })
        })
    }

    fn active_keys<'a>(
        &'a self,
        quota: &'a str,
        window: WindowSpec,
        at: Option<u64>,
    ) -> StoreFuture<'a, Vec<(String, u64)>> {
        Box::pin(async move {
            // Every bucket's index: a key is indexed in its own bucket.
            let mut out = Vec::new();
            for bucket in &self.buckets {
                let mut call = Call::new(&self.active, &ACTIVE);
                call.key("key index", format!("{bucket}keys"))
                    .arg("now", at_arg(at))
                    .arg("counter hash prefix", format!("{bucket}c:"))
                    .arg("window tag", window_tag(quota, &window))
                    .arg("most keys", MAX_KEYS_SCANNED);
                let inv = call.invocation();
                let flat: Vec<redis::Value> = self.redis.invoke(&inv).await.map_err(unavailable)?;
                for c in flat.chunks(2) {
                    match c {
                        [redis::Value::BulkString(k), n] => out.push((
                            String::from_utf8_lossy(k).into_owned(),
                            int(n)?.max(0) as u64,
                        )),
                        other => {
                            return Err(StoreError::Corrupt(format!(
                                "active keys reply {other:?}"
                            )));
                        }
                    }
                }
            }
            out.truncate(MAX_KEYS_SCANNED);
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_format_has_its_doubles() {
        let ds = DOUBLES_LUA
            .lines()
            .find_map(|l| l.strip_prefix("local DS = '<"))
            .expect("doubles.lua defines DS");
        assert_eq!(ds, format!("{}'", "d".repeat(FORMAT_DOUBLES)));
    }

    fn slot(key: &str) -> redis::cluster_routing::Slot {
        redis::cluster_routing::Slot::for_key(key)
    }

    #[test]
    fn a_keys_counters_and_index_share_its_buckets_slot() {
        for key in ["alice@a.example", "*", "{weird}key", "svc"] {
            let (c, i) = (counter_key("mr", true, key), index_key("mr", true, key));
            assert!(
                c.starts_with("mr:{mr:q:") && c.ends_with(&format!("}}:c:{key}")),
                "{c}"
            );
            assert!(i.starts_with("mr:{mr:q:") && i.ends_with("}:keys"), "{i}");
            assert_eq!(slot(&c), slot(&i), "{key}");
        }
        // Keys spread: a sender and an AUTH user land in different slots here.
        assert_ne!(
            slot(&counter_key("mr", true, "alice@a.example")),
            slot(&counter_key("mr", true, "svc"))
        );
        // Standalone: the layout before, one slot.
        assert_eq!(counter_key("mr", false, "svc"), "mr:{mr:quota}:c:svc");
        assert_eq!(index_key("mr", false, "svc"), "mr:{mr:quota}:keys");
    }

    #[test]
    fn window_tags_fit_lua_numbers_and_tell_windows_apart() {
        let minute = WindowSpec::new(10, 60_000);
        let hour = WindowSpec::new(10, 3_600_000);
        let tags = [
            window_tag("q1", &minute),
            window_tag("q1", &hour),
            window_tag("q2", &minute),
        ];
        // Lua prints numbers with 14 significant digits: a tag must print exactly.
        assert!(tags.iter().all(|&t| t.to_string().len() <= 14));
        assert!(tags[0] != tags[1] && tags[0] != tags[2] && tags[1] != tags[2]);
        // The limit is not part of the tag: changing it keeps the counters.
        assert_eq!(window_tag("q1", &WindowSpec::new(99, 60_000)), tags[0]);
        assert_eq!(bucket_field("q1", &minute, 42), format!("{}:42", tags[0]));
    }

    #[test]
    fn memory_keeps_a_round_of_senders_as_large_as_itself() {
        let m = Remembered {
            version: 1.0,
            sure: 0.0,
            records: Vec::new(),
            totals: Vec::new(),
        };
        let mut mem = Memory::default();
        let round = |mem: &mut Memory, name: &str| {
            let mut found = 0;
            for i in 0..REMEMBERED_MAX {
                let k = format!("{name}{i}");
                found += usize::from(mem.get(&k).is_some());
                mem.insert(k, m.clone());
            }
            found
        };
        assert_eq!(round(&mut mem, "a"), 0);
        // The same senders again: every one is still known (a memory that starts
        // afresh when full found none of them).
        assert_eq!(round(&mut mem, "a"), REMEMBERED_MAX);
        // A round of others pushes them to the older generation, still found...
        assert_eq!(round(&mut mem, "b"), 0);
        assert!(mem.get("a0").is_some() && mem.get("b0").is_some());
        // ...and a key checked by its tallies meanwhile is kept in the newer one.
        mem.touch("a1");
        assert_eq!(round(&mut mem, "c"), 0);
        assert!(
            mem.get("a0").is_none(),
            "two rounds later the others are gone"
        );
        assert!(mem.get("a1").is_some());
    }

    #[test]
    fn requests_are_grouped_by_key_in_order() {
        let r = |q: &str, k: &str| ChargeRequest {
            quota: q.into(),
            key: k.into(),
            cost: 1,
            windows: vec![],
        };
        let reqs = [r("a", "x"), r("b", "*"), r("c", "x")];
        assert_eq!(groups(&reqs), vec![("x", vec![0, 2]), ("*", vec![1])]);
    }
}
