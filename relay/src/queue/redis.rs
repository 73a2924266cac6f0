//! Redis queue backend, for standalone Redis, Redis Cluster, or the master of a
//! Redis Sentinel deployment (connections: [`crate::redis_conn`]).
//!
//! # Key layout
//!
//! Messages are spread over [`SHARDS`] shards; a message's shard is FNV-1a of its id
//! modulo [`SHARDS`]. Every key of a shard carries the shard's hash tag, so a shard
//! lives in one Redis Cluster slot and one Lua script can touch all of its keys. The
//! tags are placed at the centre of equal shares of the slot range
//! ([`crate::redis_conn::slots::centred_prefixes`]), so that a cluster made by
//! `redis-cli --cluster create` with 3 masters holds 5 / 6 / 5 shards (tags by
//! name, `{<prefix>:sNN}`, fell 4 / 8 / 4). With the default prefix `mr`, shard 7's
//! base is `mr:{mr:q:7.<n>}` (`n`: the first suffix that lands there).
//!
//! Where a new message goes is chosen with its id. In a cluster, ids are random,
//! so mail spreads over the shards and the masters. On a single server
//! (standalone, Sentinel) a relay makes the ids of the mail it accepts in one
//! shard of its own, its home shard, drawn when it starts ([`Ingest::new_id`]):
//! an enqueue group, a lease and a batch of outcomes then write one shard's
//! indexes and counters once, where mail spread over 16 shards had them written
//! up to 16 times (a command in a script costs Redis about as much as a small
//! command itself). Several relays on one server have a home shard each (or
//! share one); any relay delivers any shard's mail.
//!
//! A shard's keys, `<base>` its prefix:
//!
//! | key              | type       | content                                               |
//! |------------------|------------|-------------------------------------------------------|
//! | `<base>:m:<id>`  | string     | a queued message: `<envelope len>:<body len>:`, the   |
//! |                  |            | envelope (compact, `redis_envelope.rs`), the body     |
//! | `<base>:fresh`   | list       | queued, never attempted, not leased: ids in arrival   |
//! |                  |            | order (due at arrival)                                |
//! | `<base>:due`     | sorted set | queued, not leased, not fresh: id scored by next      |
//! |                  |            | attempt ms (retries, given back, swept, imported)     |
//! | `<base>:leased`  | sorted set | in flight: id scored by lease expiry ms               |
//! | `<base>:lease`   | hash       | id → token of its latest lease, until finish/release  |
//! | `<base>:later`   | sorted set | score 0: queued ids due at another time than their    |
//! |                  |            | arrival (retried, given back, swept)                  |
//! | `<base>:s:<id>`  | string     | `<attempts>:` and the JSON of [`MessageStatus`], from |
//! |                  |            | the first finish that reschedules                     |
//! | `<base>:f:<id>`  | string     | a final record: `<envelope len>:`, the envelope, the  |
//! |                  |            | final status's JSON; `PEXPIRE` of the status retention|
//! | `<base>:stats`   | hash       | `messages`, `bytes` (body bytes), `deferred`;         |
//! |                  |            | `delivered`, `bounced`, `expired` (recipients of      |
//! |                  |            | finished messages, never decremented)                 |
//!
//! A queued message is in exactly one of `fresh`, `due` and `leased`. Why so few
//! keys per message (bench/redis-cost.sh, docs/capacity.md): a queued message
//! costs one string (envelope and body in one allocation, where a hash of both was
//! a hash table with two field entries) and one `fresh` entry (about 25 bytes in a
//! list where a `due` entry cost about 125: a new message is due at its arrival,
//! so it needs no score, and arrival order is list order); the lease token goes in a
//! per-shard hash that only in-flight messages use; a message with no attempt yet
//! has no status (readers take its absence for [`MessageStatus::new`]). There is no
//! per-message arrival index: listing reads `fresh`, `due` and `leased` and sorts
//! (an operator tool), and the oldest message is the first of `fresh`, the first
//! by score in `due`, the first of `later` and those in flight.
//!
//! `lease_due` takes a shard's `due` ids due by now (retries, mail given back)
//! and the head of `fresh` in order of due time, a fresh id being due at its
//! arrival: given-back mail must not come back ahead of older new mail. Enqueues write `fresh` only with `queue.redis.fresh_list` (the
//! default); with it off they score new ids in `due` as releases before it did,
//! which read only `due`, so a rollback to one of those first turns it off and
//! waits for the lists to drain (docs/operations.md, "Upgrades"). Every reader
//! reads both, whatever the switch.
//!
//! `due` is the delivery schedule and is rescored on every retry. The schedule is
//! authoritative for when a message is next due: `retry_now` only rescores `due`
//! (a fresh id is due already), and reads fill `next_attempt_ms` in from it (a
//! fresh id, in no zset, is due at its arrival, as a message without a status
//! says).
//!
//! Scripts reach a message's keys by building them from the shard's key prefixes
//! (passed as arguments) and ids read from an index: the ids are not known before
//! the script runs. That is allowed because those keys share the shard's hash tag,
//! and so its slot.
//!
//! ## Upgrade from the layout before 2026-12
//!
//! That layout kept each message in a hash (`envelope`, `body`, `status`,
//! `attempts`, `lease`, `final`) under shard tags `{<prefix>:sNN}`, with an `ids`
//! index. This version moves such messages, queued or deferred, to the layout above
//! while delivering ([`RedisQueue::migrate_legacy`], at most once a second from
//! `lease_due`): it leases a batch in the old shard with its own token (so a relay
//! of the old version, during a rolling upgrade, does not take them meanwhile),
//! stores each in the new layout unless the new layout already has it, queued or
//! final, then deletes the old copy if its lease is still ours. A relay that dies
//! between the two leaves the old copy leased; the lease expires, and the next move
//! finds the new copy (or its final record) and only deletes the old one: each
//! message is delivered once, unless its final record expired meanwhile (the status
//! retention, 24 h by default). Messages in flight at relays of the old version are
//! left to them. Old final records stay readable by `status` until they expire;
//! queue totals (`stats`) add the old shards' counters.
//!
//! # Round trips and failure semantics
//!
//! `enqueue` is group-committed (`redis_enqueue.rs`): enqueues of concurrent
//! sessions that arrive while a call is in flight go together in the next one, a
//! pipeline of one `MULTI`/`EXEC` of native commands (one `MSETNX` of the stored
//! values, one `RPUSH` per shard to `fresh`, on standalone Redis and Sentinel each
//! `accepted` event's `XADD`, each shard's counters once) and, when
//! `wait_replicas > 0`, one `WAIT` for the whole group; one lane of calls on a
//! single server, one per shard in a cluster. No script: Redis 7's Lua hashes
//! every byte of every string a script is handed, so a body sent through Lua cost
//! Redis more than the rest of the enqueue. An id the transaction finds already
//! stored makes the group's `MSETNX` store none, and one script call right after
//! stores the group (see "An `enqueue` of an id that is already stored" below).
//! Quota-guarded
//! enqueues are one `EVALSHA` per group (the guard decides inside it whether each
//! message is stored). An idle relay's enqueue goes at once, alone. A caller is
//! answered only from the call that holds its message. Only after Redis restarts
//! or fails over does the first script call see `NOSCRIPT`, load the script and
//! try again; a transaction holds no script, so a lost script cannot leave half
//! of one behind.
//!
//! `lease_due` visits shards round-robin from an offset that rotates per call (so
//! every shard's expired leases get swept and no shard starves), stopping once it
//! has `max` messages: on a single server (standalone, Sentinel) with **one** lease
//! script call over every shard's keys, in a cluster with one call per shard (a
//! script's keys must share a slot). On a single server a call visits every shard
//! about once a second ([`FULL_ROUND_EVERY_MS`]); between, only those that may have
//! mail due: the relay's home shard, shards it wrote to, took from or has not
//! reached since a sweep, and shards where a retry or a give-back it wrote is due
//! by now. So another relay's mail outside that relay's home shard (its bounces,
//! a dead relay's backlog) and expired leases are taken a second later at most.
//! The script sweeps expired leases back to due
//! (when the relay asks, about once a second per shard: [`SWEEP_EVERY_MS`]),
//! takes due ids, writes each shard's index entries and lease tokens with one
//! variadic command each, and returns ids and due scores only; the relay then
//! reads the stored values and statuses with plain `MGET`s (one pipeline; one per
//! shard in a cluster). Bodies never pass through Lua, which copies and hashes
//! every byte of a string it creates. So taking work costs two round trips on a
//! single server (an idle poll one), up to 2 per shard visited in a cluster. A value
//! gone by the read (removed meanwhile, or a schedule entry without its message)
//! is not delivered and its lease dropped (`lease_drop.lua`); one replaced by an
//! enqueue of the same id in between is delivered under a lease the replacement
//! already ended, so its finish is refused and the new message is delivered again
//! (at least once, as when the replacement comes during delivery). Before that,
//! at most once a second (every 30 s once the old layout is empty), it moves
//! messages of the old layout over (see "Upgrade" above). `renew` and `status`
//! are one script each. `finish_batch` is one finish script call for the whole
//! batch on a single server (up to 128 items a call, a bigger batch takes several
//! in one pipeline), one per shard involved in a cluster (sent concurrently);
//! `finish` is a batch of one. Inside, the items of a shard share one command per
//! index (`HMGET` of their tokens, variadic `ZREM`/`HDEL`/`DEL`); each item is
//! still checked against its own lease, and what only some need (a status, a
//! lease swept back to due) stays per item, so a delivered message costs the
//! script one command of its own (the final record's `SET`). The relay builds
//! that record from the envelope it read with the lease ([`LeaseHead`]); a lease
//! without it (made by hand) has the script read the envelope itself. On a
//! single server the batch's delivery events are plain `XADD`s ahead of the
//! calls in the same pipeline (`finish_batch_with_events`), so the events cost no
//! round trip of their own. What a message costs Redis is mostly the commands a
//! script runs for it and the bytes it moves through Lua (each string handed to
//! or made in a script is copied and hashed byte by byte: a 1 KB one costs about
//! 1.7 µs), not the script call itself (about 1 µs; bench/README.md, "One finish
//! call per batch"). `renew_all`
//! (the heartbeat of a batch in flight) and `release`/`give_back` run one script per
//! shard involved, all in one pipeline, so one round trip per batch (in a cluster:
//! one request per shard, at once); `stats` is one pipeline (one per shard in a
//! cluster). `list` and `retry_now` by domain read
//! every queued status, a page of 200 per script call: operator tools, not
//! something to poll.
//!
//! An `enqueue` of an id that is already stored replaces it without counting it twice,
//! so retrying one whose outcome was not learned is safe. That is also why a dropped
//! connection is retried once inside the operation. On the plain path this takes two
//! steps: the group's transaction stores no value (`MSETNX` is all or none) but adds
//! the ids to `fresh` and counts them; the replacement script then takes that
//! entry back, stores each (the old copy replaced: its old lease, status and
//! indexes go, so one `fresh` entry is left) and takes those counts back, and only
//! then are the group's callers answered. A relay that dies between
//! the two leaves the old copy queued (delivered once more), the group's other
//! messages unstored (never answered `250`; their `fresh` entries are dropped as
//! debris) and the shards' counters too high by the group's size. An error after the script ran (a
//! response timeout, a `WAIT` that too few replicas acknowledged) still leaves the
//! message stored: the SMTP client is told to retry, and may then deliver a duplicate.
//! The same retry makes the other scripts at-least-once too: a `lease_due` that ran but
//! whose reply was lost leaves leases nobody holds (they expire and the messages come
//! back), and a `finish` that ran may answer `LeaseLost` when retried.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::{
    ErrorKind, FromRedisValue, Pipeline, RedisError, Script, ScriptInvocation, ServerErrorKind,
    Value,
};

use super::{
    DeliveryTotals, Envelope, FinishResult, Ingest, Inspect, Lease, LeaseHead, Leased, Leasing,
    ListFilter, MessageStatus, QueueError, QueueFuture, QueueId, QueueOptions, QueueStats,
    QueuedMessage, RetrySelector, Store, StoredHead, lease_token, now_ms,
};
use crate::config::RedisConfig;

#[path = "redis_envelope.rs"]
mod envelope_codec;
#[path = "redis_enqueue.rs"]
mod grouped;
use crate::redis_conn::script::{Call, Layout};
use crate::redis_conn::{self, ConnectError, Timeouts, is_connection_error, redact};

/// Number of shards. Part of the storage format: changing it moves ids to other shards
/// and orphans every message already queued.
pub const SHARDS: u16 = 16;

/// One attempt to open a TCP connection to a Redis node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One command's reply; must exceed `wait_timeout` (at most
/// [`crate::config::MAX_WAIT_TIMEOUT`]), which blocks the reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole operation, retries and reconnects included, so that a caller always gets
/// an answer even when Redis is unreachable.
const OP_DEADLINE: Duration = Duration::from_secs(8);
/// Reconnect attempts (with backoff) after a connection broke, per failing request.
const RECONNECT_RETRIES: usize = 2;
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// Expired leases one `lease_due` script returns to due (over all the shards it
/// is given), so a script stays short (it blocks its Redis node) even after a long
/// outage.
const SWEEP_LIMIT: usize = 1000;
/// How often (by the lease's own clock) a relay's `lease_due` sweeps a shard's
/// expired leases back to due. Every command a script runs costs Redis about
/// 10,000 instructions (more than a small command itself), and a lease over every
/// shard of a single server ran one sweep per shard, a third of its commands,
/// while an expired lease (a dead relay) is rare; it now waits at most this long
/// beyond its expiry.
const SWEEP_EVERY_MS: u64 = 1_000;

/// On a single server a lease visits every shard about once a second; between,
/// only the relay's home shard and the shards it knows may have mail due (what
/// it wrote to, what gave mail at the last visit or was not reached). An empty
/// shard costs a visit two commands (`due` and `fresh`), about 20,000
/// instructions of Redis: with each relay's new mail in its home shard, a lease
/// over all 16 spent most of its time on empty ones. What no live relay writes
/// (a dead relay's mail, retries coming due, expired leases) is found at the
/// next full round, a second later at most.
const FULL_ROUND_EVERY_MS: u64 = 1_000;

/// Most due times remembered per shard (see `RedisQueue::known_due`).
const KNOWN_DUE_CAP: usize = 1_024;
/// How far ahead of a lease's `now` the id of a `fresh` message may have been
/// made and still be taken: relays' clocks differ a little, and a message's
/// arrival time is its own (the id's time is only close to it). An id further
/// ahead (a clock gone wrong, or a caller's `now` in the past) goes to `due`,
/// scored by the id's time, rather than blocking the list.
const FRESH_SKEW_MS: u64 = 10_000;
/// Messages whose values one `MGET` of a lease reads (see `lease_shards`).
const LEASE_READ_CHUNK: usize = 16;
/// Messages read per script call when listing or selecting by status: long enough to
/// make few round trips, short enough not to block Redis noticeably.
const PAGE: usize = 200;

/// KEYS/ARGV of `remove.lua`.
const REMOVE: Layout = Layout {
    keys: &[
        "message", "due", "stats", "leased", "lease", "later", "status", "final", "fresh",
    ],
    args: &["id"],
};
/// KEYS/ARGV of `lease.lua`.
const LEASE: Layout = Layout {
    keys: &["due, leased, lease, later, fresh.."],
    args: &[
        "now",
        "expires",
        "max",
        "token",
        "sweep limit",
        "fresh cutoff",
    ],
};
/// KEYS/ARGV of `lease_drop.lua`.
const LEASE_DROP: Layout = Layout {
    keys: &["due", "leased", "lease", "later", "message.."],
    args: &["token", "id.."],
};
/// KEYS/ARGV of the finish script (`finish.lua` and `finish_main.lua`): a batch,
/// shard after shard.
const FINISH: Layout = Layout {
    keys: &["due, leased, lease, later, stats, then per item message, status, final.."],
    args: &[
        "retention",
        "items, finals' delivered, bounced, expired, count, bytes, then per item id, token, status or record, next attempt:attempts, delivered:bounced:expired, body len..",
    ],
};
/// Keys of each shard of a [`FINISH`] call, and of each of its items.
const FINISH_SHARD_KEYS: usize = 5;
const FINISH_ITEM_KEYS: usize = 3;
/// Most items in one finish call: a bigger batch goes in several calls (in one
/// pipeline), so that one call holds Redis (which serves no one else meanwhile)
/// for a few milliseconds at most.
const FINISH_MAX_ITEMS: usize = 128;
/// KEYS/ARGV of `renew.lua`.
const RENEW: Layout = Layout {
    keys: &["due", "leased", "lease"],
    args: &["id", "token", "expires"],
};
/// KEYS/ARGV of `release.lua`.
const RELEASE: Layout = Layout {
    keys: &["due", "leased", "lease", "later"],
    args: &["id, token, due.."],
};
/// KEYS/ARGV of `renew_all.lua`.
const RENEW_ALL: Layout = Layout {
    keys: &["due", "leased", "lease"],
    args: &["expires", "id, token.."],
};
/// KEYS/ARGV of `status.lua`.
const STATUS: Layout = Layout {
    keys: &["message", "due", "leased", "status", "final"],
    args: &["id"],
};
/// KEYS/ARGV of `page.lua`.
const PAGE_LAYOUT: Layout = Layout {
    keys: &["due", "leased"],
    args: &["message prefix", "status prefix", "ids.."],
};
/// KEYS/ARGV of `retry_ids.lua`.
const RETRY_IDS: Layout = Layout {
    keys: &["due"],
    args: &["now", "ids.."],
};
/// KEYS/ARGV of `retry_all.lua`.
const RETRY_ALL: Layout = Layout {
    keys: &["due"],
    args: &["now", "limit"],
};
/// KEYS/ARGV of `import.lua`.
const IMPORT: Layout = Layout {
    keys: &["message", "due", "stats", "later", "status", "final"],
    args: &["id", "stored", "body length", "due", "status"],
};
/// KEYS/ARGV of `legacy_take.lua`.
const LEGACY_TAKE: Layout = Layout {
    keys: &["due", "leased"],
    args: &[
        "now",
        "expires",
        "max",
        "token",
        "message prefix",
        "sweep limit",
    ],
};
/// KEYS/ARGV of `legacy_forget.lua`.
const LEGACY_FORGET: Layout = Layout {
    keys: &["message", "due", "leased", "ids", "stats"],
    args: &["id", "token"],
};

/// `local function enqueue(k, m, a)`: stores one message of a group, and the
/// helpers of the group scripts.
const ENQUEUE_LUA: &str = include_str!("lua/enqueue.lua");
/// Stores the messages of a group whose ids its transaction found already stored
/// ([`grouped::REPLACE_GROUP`]).
const ENQUEUE_REPLACE_MAIN_LUA: &str = include_str!("lua/enqueue_replace_main.lua");
/// `local A0 = 0`: the guards' clock is the group's first argument.
const GUARDED_ARGS_LUA: &str = include_str!("lua/guarded_args.lua");

const REMOVE_LUA: &str = include_str!("lua/remove.lua");

const LEASE_LUA: &str = include_str!("lua/lease.lua");
/// Drops leases of messages found gone when read after the lease.
const LEASE_DROP_LUA: &str = include_str!("lua/lease_drop.lua");

const FINISH_LUA: &str = include_str!("lua/finish.lua");
/// Runs `finish()` on each item of a batch, and appends the batch's events.
const FINISH_MAIN_LUA: &str = include_str!("lua/finish_main.lua");

const RENEW_LUA: &str = include_str!("lua/renew.lua");

const RELEASE_LUA: &str = include_str!("lua/release.lua");

const RENEW_ALL_LUA: &str = include_str!("lua/renew_all.lua");

const STATUS_LUA: &str = include_str!("lua/status.lua");

const PAGE_LUA: &str = include_str!("lua/page.lua");

const RETRY_IDS_LUA: &str = include_str!("lua/retry_ids.lua");

const RETRY_ALL_LUA: &str = include_str!("lua/retry_all.lua");

const IMPORT_LUA: &str = include_str!("lua/import.lua");

const LEGACY_TAKE_LUA: &str = include_str!("lua/legacy_take.lua");

const LEGACY_FORGET_LUA: &str = include_str!("lua/legacy_forget.lua");

/// Messages one move from the old layout takes per old shard.
const MIGRATE_BATCH: usize = 100;
/// How long a message being moved stays leased in the old layout: past it, a
/// relay that died mid-move has its message taken (and moved) again.
const MIGRATE_LEASE: Duration = Duration::from_secs(60);
/// At most one move round per this interval per relay while the old layout has
/// messages; [`MIGRATE_IDLE_MS`] once a round found none (16 small scripts per
/// round would otherwise add about a third to an idle relay's Redis commands).
const MIGRATE_EVERY_MS: u64 = 1000;
const MIGRATE_IDLE_MS: u64 = 30_000;

/// Redis at `maxmemory` refusing a write (`OOM command not allowed…`), also when a
/// script's first write was refused. Under `noeviction` a script is refused before
/// it wrote anything, so the enqueue left nothing behind; and the scripts that free
/// memory (lease, finish, remove) start with a deletion, which Redis lets run even
/// then, so delivery can drain a full store.
fn is_out_of_memory(e: &RedisError) -> bool {
    // A command of a pipeline (the enqueue script is one) fails inside a pipeline
    // error, whose own code is that of its first failure only.
    e.code() == Some("OOM")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, s)| s.code() == "OOM"))
}

/// The queue's scripts, loaded at connect and again whenever Redis lost them.
struct Scripts {
    enqueue_replace: Script,
    remove: Script,
    lease: Script,
    lease_drop: Script,
    finish: Script,
    renew: Script,
    renew_all: Script,
    release: Script,
    status: Script,
    page: Script,
    retry_ids: Script,
    retry_all: Script,
    import: Script,
    legacy_take: Script,
    legacy_forget: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            enqueue_replace: Script::new(&[ENQUEUE_LUA, ENQUEUE_REPLACE_MAIN_LUA].concat()),
            remove: Script::new(REMOVE_LUA),
            lease: Script::new(LEASE_LUA),
            lease_drop: Script::new(LEASE_DROP_LUA),
            finish: Script::new(&[FINISH_LUA, FINISH_MAIN_LUA].concat()),
            renew: Script::new(RENEW_LUA),
            renew_all: Script::new(RENEW_ALL_LUA),
            release: Script::new(RELEASE_LUA),
            status: Script::new(STATUS_LUA),
            page: Script::new(PAGE_LUA),
            retry_ids: Script::new(RETRY_IDS_LUA),
            retry_all: Script::new(RETRY_ALL_LUA),
            import: Script::new(IMPORT_LUA),
            legacy_take: Script::new(LEGACY_TAKE_LUA),
            legacy_forget: Script::new(LEGACY_FORGET_LUA),
        }
    }

    fn all(&self) -> [&Script; 15] {
        [
            &self.enqueue_replace,
            &self.remove,
            &self.lease,
            &self.lease_drop,
            &self.finish,
            &self.renew,
            &self.renew_all,
            &self.release,
            &self.status,
            &self.page,
            &self.retry_ids,
            &self.retry_all,
            &self.import,
            &self.legacy_take,
            &self.legacy_forget,
        ]
    }
}

pub(crate) use crate::redis_conn::Conn;

/// What one lease script call took.
struct Taken {
    /// The messages leased (those gone by the read left out).
    leased: Vec<Leased>,
    /// A bit per shard it took from (gone messages included).
    from: u32,
    /// Whether it took all it was asked for: it stopped at the shard that filled it.
    filled: bool,
    /// Whether it swept expired leases back to due (every shard it was given).
    swept: bool,
}

/// The Redis queue. Cheap to share behind an `Arc`; all calls multiplex over the same
/// connection(s).
pub struct RedisQueue {
    conn: Conn,
    prefix: String,
    wait_replicas: u32,
    options: QueueOptions,
    /// Strings that must never reach an error message or a log line.
    secrets: Vec<String>,
    scripts: Scripts,
    /// Where the next `lease_due` starts its round over the shards.
    next_shard: AtomicUsize,
    /// The key names of every shard, built once: formatting them per call was
    /// ~10,000 instructions per message (about 11 uses each).
    shard_keys: Vec<ShardKeys>,
    /// The old layout's shards, moved over by [`RedisQueue::migrate_legacy`].
    legacy_keys: Vec<LegacyKeys>,
    /// When the next move round from the old layout is due (ms).
    next_migration: std::sync::atomic::AtomicU64,
    /// Per shard, the lease clock (ms) of this relay's last sweep of its expired
    /// leases (see [`SWEEP_EVERY_MS`]).
    last_sweep: Vec<std::sync::atomic::AtomicU64>,
    /// Group commit of enqueues: one lane on a single server, one per shard in a
    /// cluster (see `redis_enqueue.rs`).
    lanes: Vec<grouped::Lane>,
    /// On a single server, the shard of the ids this relay makes for new mail
    /// ([`Ingest::new_id`]); `None` in a cluster, where ids spread over the shards
    /// and so over the masters.
    home_shard: Option<u16>,
    /// On a single server, a bit per shard that may hold mail due now (see
    /// [`FULL_ROUND_EVERY_MS`]): set by this relay's writes to a shard, by a lease
    /// that took from it, and by a sweep that did not reach it; cleared by a lease
    /// that found it empty.
    busy: std::sync::atomic::AtomicU32,
    /// Per shard, the times (ms) this relay put mail there due later (retries,
    /// mail given back), earliest first: a lease visits the shard from then on,
    /// as if busy. At most [`KNOWN_DUE_CAP`] each; what is not kept is found by
    /// a full round.
    known_due: Vec<std::sync::Mutex<std::collections::BinaryHeap<std::cmp::Reverse<u64>>>>,
    /// The lease clock (ms) of the last lease that visited every shard; `u64::MAX`
    /// before the first.
    last_full_round: std::sync::atomic::AtomicU64,
}

/// The queue's Redis connection, lent to stores that keep their data beside the
/// queue (quota counters): the same server or cluster and key prefix, the same
/// reconnection, and errors with the same secrets redacted. Cheap to clone.
#[derive(Clone)]
pub struct SharedRedis {
    conn: Conn,
    prefix: String,
    secrets: std::sync::Arc<[String]>,
}

impl std::fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRedis")
            .field("cluster", &self.is_cluster())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedRedis {
    /// The configured key prefix (`queue.redis.key_prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// Loads a script, so that later calls are one `EVALSHA` round trip.
    pub async fn load(&self, script: &Script) -> Result<(), String> {
        let mut conn = self.conn.clone();
        script
            .load_async(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| redact(&self.secrets, &format!("redis script load: {e}")))
    }

    /// Runs a script: one `EVALSHA` (plus a load and a second try if Redis lost the
    /// script), tried once more after a dropped connection, like the queue's own
    /// calls. The caller bounds the time. Errors are redacted text.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let result = match invocation.invoke_async(&mut self.conn.clone()).await {
            Err(e) if is_connection_error(&e) => {
                tokio::time::sleep(RETRY_DELAY).await;
                invocation.invoke_async(&mut self.conn.clone()).await
            }
            other => other,
        };
        result.map_err(|e| redact(&self.secrets, &format!("redis: {e}")))
    }

    /// Runs one plain command (no script), tried once more after a dropped
    /// connection. The caller bounds the time. Errors are redacted text.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let result = match cmd.query_async(&mut self.conn.clone()).await {
            Err(e) if is_connection_error(&e) => {
                tokio::time::sleep(RETRY_DELAY).await;
                cmd.query_async(&mut self.conn.clone()).await
            }
            other => other,
        };
        result.map_err(|e| redact(&self.secrets, &format!("redis: {e}")))
    }

    /// Runs a pipeline of plain commands in one round trip, like [`Self::query`].
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, String> {
        let result = match pipe.query_async(&mut self.conn.clone()).await {
            Err(e) if is_connection_error(&e) => {
                tokio::time::sleep(RETRY_DELAY).await;
                pipe.query_async(&mut self.conn.clone()).await
            }
            other => other,
        };
        result.map_err(|e| redact(&self.secrets, &format!("redis: {e}")))
    }
}

/// A Lua guard that runs in the same atomic call as an enqueue and decides whether
/// the message is stored (quota counters): see [`RedisQueue::enqueue_guarded`].
pub struct EnqueueGuard {
    /// Guarded enqueues of concurrent sessions go in one call.
    lane: grouped::Lane,
}

/// Per message of a group, the guard, then the enqueue only if the guard allowed
/// it ([`grouped::GUARDED_GROUP`]).
const GUARDED_GROUP_MAIN: &str = include_str!("lua/guarded_group_main.lua");

/// The script of a guarded enqueue around `guard_lua` (see
/// [`RedisQueue::enqueue_guard`]).
pub fn guarded_enqueue_lua(guard_lua: &str) -> String {
    [GUARDED_ARGS_LUA, guard_lua, ENQUEUE_LUA, GUARDED_GROUP_MAIN].concat()
}

/// Every script as Redis runs it, by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    vec![
        (
            "queue_enqueue_replace",
            [ENQUEUE_LUA, ENQUEUE_REPLACE_MAIN_LUA].concat(),
        ),
        ("queue_remove", REMOVE_LUA.to_owned()),
        ("queue_lease", LEASE_LUA.to_owned()),
        ("queue_lease_drop", LEASE_DROP_LUA.to_owned()),
        ("queue_finish", [FINISH_LUA, FINISH_MAIN_LUA].concat()),
        ("queue_renew", RENEW_LUA.to_owned()),
        ("queue_release", RELEASE_LUA.to_owned()),
        ("queue_renew_all", RENEW_ALL_LUA.to_owned()),
        ("queue_status", STATUS_LUA.to_owned()),
        ("queue_page", PAGE_LUA.to_owned()),
        ("queue_retry_ids", RETRY_IDS_LUA.to_owned()),
        ("queue_retry_all", RETRY_ALL_LUA.to_owned()),
        ("queue_import", IMPORT_LUA.to_owned()),
        ("queue_legacy_take", LEGACY_TAKE_LUA.to_owned()),
        ("queue_legacy_forget", LEGACY_FORGET_LUA.to_owned()),
    ]
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("cluster", &self.conn.is_cluster())
            .field("prefix", &self.prefix)
            .field("wait_replicas", &self.wait_replicas)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// Connects (standalone, cluster per `cfg.cluster`, or sentinel per the URL) with default
    /// [`QueueOptions`], loads the scripts and checks that Redis answers. Fails within
    /// a few seconds when Redis is unreachable.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, QueueError> {
        Self::connect_with(cfg, QueueOptions::default()).await
    }

    /// [`RedisQueue::connect`] with explicit options.
    pub async fn connect_with(
        cfg: &RedisConfig,
        options: QueueOptions,
    ) -> Result<Self, QueueError> {
        let timeouts = Timeouts {
            connect: CONNECT_TIMEOUT,
            response: RESPONSE_TIMEOUT,
            deadline: OP_DEADLINE,
            retries: RECONNECT_RETRIES,
        };
        let (conn, secrets) = redis_conn::connect(cfg, &timeouts)
            .await
            .map_err(|e| match e {
                ConnectError::Failed(msg) => {
                    QueueError::Unavailable(format!("redis connect: {msg}"))
                }
                ConnectError::Timeout(d) => QueueError::Timeout(d),
            })?;

        let shard_keys = ShardKeys::all(&cfg.key_prefix);
        let scripts = Scripts::new();
        let runner = grouped::Runner {
            conn: conn.clone(),
            secrets: secrets.clone().into(),
            wait_replicas: cfg.wait_replicas,
            wait_timeout_ms: cfg.wait_timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64,
            shard_keys: shard_keys.clone().into(),
            fresh_list: cfg.fresh_list,
            stream: crate::events::log::stream_key(&cfg.key_prefix),
        };
        let home_shard = (!conn.is_cluster()).then(|| rand::random::<u16>() % SHARDS);
        let lanes = (0..if conn.is_cluster() { SHARDS } else { 1 })
            .map(|_| {
                grouped::Lane::new(
                    runner.clone(),
                    grouped::Kind::Plain(scripts.enqueue_replace.clone()),
                )
            })
            .collect();
        let queue = RedisQueue {
            conn,
            prefix: cfg.key_prefix.clone(),
            wait_replicas: cfg.wait_replicas,
            options,
            secrets,
            scripts,
            next_shard: AtomicUsize::new(rand::random::<u16>().into()),
            shard_keys,
            legacy_keys: (0..SHARDS)
                .map(|s| LegacyKeys::new(&cfg.key_prefix, s))
                .collect(),
            next_migration: std::sync::atomic::AtomicU64::new(0),
            last_sweep: (0..SHARDS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            lanes,
            home_shard,
            busy: std::sync::atomic::AtomicU32::new(u32::MAX),
            known_due: (0..SHARDS).map(|_| Default::default()).collect(),
            last_full_round: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        // Loading now keeps the first enqueue to one round trip.
        queue
            .deadline("load scripts", async {
                let mut conn = queue.conn.clone();
                for script in queue.scripts.all() {
                    script
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| queue.unavailable("script load", e))?;
                }
                Ok(())
            })
            .await?;
        tracing::info!(
            cluster = cfg.cluster,
            sentinel = matches!(queue.conn, Conn::Sentinel(_)),
            prefix = %queue.prefix,
            wait_replicas = cfg.wait_replicas,
            home_shard = queue.home_shard,
            "redis queue connected"
        );
        Ok(queue)
    }

    /// The shard of the ids this relay makes for new mail on a single server
    /// ([`Ingest::new_id`]); `None` in a cluster.
    pub fn home_shard(&self) -> Option<u16> {
        self.home_shard
    }

    /// Builds and loads the script of a guarded enqueue: `guard_lua` must define
    /// `local function guard(K0)` returning `allowed, reply`, reading its keys from
    /// `KEYS[K0 + 1]` (its last key from `KEYS[#KEYS]`, the same for every call
    /// of one guard) and its arguments from `ARGV[A0 + 1]` (`A0` is an upvalue
    /// the group script moves to each message's guard arguments before calling
    /// it; the clock, `ARGV[A0 + 1]`, is read once per call, from the first
    /// message's). `None` in Redis Cluster, where the guard's keys live in
    /// another slot than the message's.
    pub async fn enqueue_guard(&self, guard_lua: &str) -> Result<Option<EnqueueGuard>, QueueError> {
        if self.conn.is_cluster() {
            return Ok(None);
        }
        let script = Script::new(&guarded_enqueue_lua(guard_lua));
        self.deadline("load scripts", async {
            script
                .load_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.unavailable("script load", e))
        })
        .await?;
        let runner = self.lanes[0].runner().clone();
        Ok(Some(EnqueueGuard {
            lane: grouped::Lane::new(runner, grouped::Kind::Guarded(script)),
        }))
    }

    /// Runs `guard` with `keys` and `args` and, only if it allows, stores `msg`,
    /// atomically (guarded enqueues of concurrent sessions go in one call, each
    /// message's guard and enqueue together, with `WAIT` for replicas after it as
    /// [`Queue::enqueue`] does). Returns whether the message was stored and the
    /// guard's reply. Errors as for [`Queue::enqueue`]; the guard's writes stay even
    /// when a later `WAIT` fails.
    pub async fn enqueue_guarded(
        &self,
        msg: &QueuedMessage,
        guard: &EnqueueGuard,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<(bool, Vec<u8>), QueueError> {
        let Some((index, keys)) = keys.split_last() else {
            return Err(QueueError::Invalid(
                "guarded enqueue: the guard has no keys".into(),
            ));
        };
        let part = grouped::GuardPart {
            keys: keys.to_vec(),
            index: index.clone(),
            args: args.to_vec(),
        };
        self.deadline("enqueue", async move {
            let outcome = self
                .enqueue_grouped(&guard.lane, msg, None, Some(part))
                .await?;
            Ok((outcome.stored, outcome.guard_reply))
        })
        .await
    }

    /// Hands `msg` to `lane` for its next group call and waits for that call's
    /// answer.
    async fn enqueue_grouped(
        &self,
        lane: &grouped::Lane,
        msg: &QueuedMessage,
        event: Option<Vec<u8>>,
        guard: Option<grouped::GuardPart>,
    ) -> Result<grouped::Outcome, QueueError> {
        use std::io::Write;
        let id = valid_id(&msg.envelope.id)?;
        let envelope = envelope_codec::encode(&msg.envelope);
        // The stored value (see [`Stored`]), built once here: the lane's task
        // outlives the borrow of `msg`.
        let mut stored = Vec::with_capacity(24 + envelope.len() + msg.body.len());
        let _ = write!(stored, "{}:{}:", envelope.len(), msg.body.len());
        stored.extend_from_slice(&envelope);
        stored.extend_from_slice(&msg.body);
        let shard = shard_of(id);
        self.mark_busy([shard]);
        lane.submit(|reply| grouped::Item {
            shard,
            id: id.to_owned(),
            stored,
            body_len: msg.body.len(),
            due: msg.envelope.received_at_ms,
            // One due later (an arrival time ahead of the clock) needs its score.
            fresh: lane.runner().fresh_list && msg.envelope.received_at_ms <= now_ms(),
            event,
            guard,
            reply,
        })
        .await
    }

    /// The lane of a message of `shard`: the only one on a single server.
    fn lane(&self, shard: u16) -> &grouped::Lane {
        &self.lanes[usize::from(shard) % self.lanes.len()]
    }

    /// A handle on this queue's connection for other stores (see [`SharedRedis`]).
    pub fn shared(&self) -> SharedRedis {
        SharedRedis {
            conn: self.conn.clone(),
            prefix: self.prefix.clone(),
            secrets: self.secrets.clone().into(),
        }
    }

    /// Finishes `items` (see [`Leasing::finish_batch`]) and, on a single server,
    /// writes `events` with them: one finish script call per [`FINISH_MAX_ITEMS`]
    /// items on a single server, all in one pipeline; in a cluster, one call per
    /// shard involved (and per [`FINISH_MAX_ITEMS`]), sent at once. Each call
    /// carries the events of its own items, written before its outcomes; an append
    /// that fails (a full Redis) does not stop the outcomes, and marks `events`
    /// unwritten for the caller to append them on their own. The events of items refused before Redis (an
    /// invalid status) go with the first call.
    async fn finish_many(
        &self,
        items: Vec<(Lease, MessageStatus)>,
        events: Option<&crate::events::log::OutcomeEvents>,
    ) -> Result<Vec<Result<FinishResult, QueueError>>, QueueError> {
        struct Ready {
            /// Place in `items`.
            index: usize,
            id: QueueId,
            shard: u16,
            token: String,
            head: LeaseHead,
            status: MessageStatus,
            json: Vec<u8>,
        }
        let now = now_ms();
        let mut out: Vec<Option<Result<FinishResult, QueueError>>> =
            Vec::with_capacity(items.len());
        let mut ready: Vec<Ready> = Vec::with_capacity(items.len());
        let mut refused = Vec::new();
        for (index, (lease, status)) in items.into_iter().enumerate() {
            let answer = match (
                status.prepared_for_finish(&lease, now),
                QueueId::parse(lease.id.as_str()),
            ) {
                (Err(e), _) => Some(Err(e)),
                (Ok(_), None) => Some(Ok(FinishResult::LeaseLost)),
                (Ok(status), Some(id)) => match encode("status", &status) {
                    Err(e) => Some(Err(e)),
                    Ok(json) => {
                        let shard = shard_of(id.as_str());
                        if let Some(at) = status.next_attempt_ms {
                            self.note_due(shard, at);
                        }
                        ready.push(Ready {
                            index,
                            id,
                            shard,
                            token: lease.token,
                            head: lease.head,
                            status,
                            json,
                        });
                        None
                    }
                },
            };
            if answer.is_some() {
                refused.push(index);
            }
            out.push(answer);
        }
        // The calls, as lists of places in `ready`, shard after shard: a call
        // passes each of its shards' keys once.
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (r, item) in ready.iter().enumerate() {
            by_shard.entry(item.shard).or_default().push(r);
        }
        let mut calls: Vec<Vec<usize>> = Vec::new();
        if self.conn.is_cluster() {
            for list in by_shard.into_values() {
                calls.extend(list.chunks(FINISH_MAX_ITEMS).map(<[usize]>::to_vec));
            }
        } else {
            let all: Vec<usize> = by_shard.into_values().flatten().collect();
            calls.extend(all.chunks(FINISH_MAX_ITEMS).map(<[usize]>::to_vec));
        }
        let events = events.filter(|e| !e.is_empty() && !self.conn.is_cluster());
        let retention_ms = u64::try_from(self.options.status_retention.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let hash = self.scripts.finish.get_hash();
        let mut pipes = Vec::with_capacity(calls.len());
        for call_items in &calls {
            // Runs of one shard (the items are in shard order).
            let runs: Vec<&[usize]> = call_items
                .chunk_by(|&a, &b| ready[a].shard == ready[b].shard)
                .collect();
            let mut pipe = redis::pipe();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(hash)
                .arg(runs.len() * FINISH_SHARD_KEYS + call_items.len() * FINISH_ITEM_KEYS);
            let mut call = Call::onto(cmd, &FINISH);
            const KEYS: &str =
                "due, leased, lease, later, stats, then per item message, status, final..";
            for run in &runs {
                let keys = self.shard(ready[run[0]].shard);
                call.key(KEYS, &keys.due)
                    .key(KEYS, &keys.leased)
                    .key(KEYS, &keys.lease)
                    .key(KEYS, &keys.later)
                    .key(KEYS, &keys.stats);
                for &r in *run {
                    let id = ready[r].id.as_str();
                    call.key(KEYS, keys.message(id))
                        .key(KEYS, keys.status(id))
                        .key(KEYS, keys.fin(id));
                }
            }
            call.arg("retention", retention_ms);
            const ARGS: &str = "items, finals' delivered, bounced, expired, count, bytes, then per item id, token, status or record, next attempt:attempts, delivered:bounced:expired, body len..";
            for run in &runs {
                // The run's totals over its final items, as if every lease held
                // (the script takes a lost one's back out): summed here, they cost
                // Redis no per-item arithmetic.
                let mut sums = [0u64; 5];
                for &r in *run {
                    let item = &ready[r];
                    if item.status.next_attempt_ms.is_none() {
                        let t = DeliveryTotals::of(&item.status);
                        sums[0] += t.delivered;
                        sums[1] += t.bounced;
                        sums[2] += t.expired;
                        sums[3] += 1;
                        sums[4] += item.head.0.as_deref().map_or(0, |h| h.body_len);
                    }
                }
                call.arg(ARGS, run.len());
                for sum in sums {
                    call.arg(ARGS, sum);
                }
                for &r in *run {
                    let item = &ready[r];
                    let totals = DeliveryTotals::of(&item.status);
                    let next = item
                        .status
                        .next_attempt_ms
                        .map_or_else(String::new, |t| format!("{t}:{}", item.status.attempts));
                    // A final item whose envelope came with its lease: the whole record.
                    let head = item
                        .head
                        .0
                        .as_deref()
                        .filter(|_| item.status.next_attempt_ms.is_none());
                    let record = head.map(|h| final_record(&h.envelope, &item.json));
                    call.arg(ARGS, item.id.as_str())
                        .arg(ARGS, &item.token)
                        .arg(ARGS, record.as_deref().unwrap_or(&item.json))
                        .arg(ARGS, next)
                        .arg(
                            ARGS,
                            format!("{}:{}:{}", totals.delivered, totals.bounced, totals.expired),
                        )
                        .arg(
                            ARGS,
                            head.map_or_else(String::new, |h| h.body_len.to_string()),
                        );
                }
            }
            call.done();
            pipes.push(pipe);
        }
        let replies = match events {
            Some(events) => self.finish_calls_with_events(&pipes, events).await?,
            None => {
                self.script_per_shard("finish", &self.scripts.finish, pipes)
                    .await?
            }
        };
        if replies.len() != calls.len() {
            return Err(QueueError::Corrupt(format!(
                "redis finish: {} replies for {} calls",
                replies.len(),
                calls.len()
            )));
        }
        for (call_items, reply) in calls.iter().zip(replies) {
            let codes: Vec<i64> = redis::from_redis_value(reply)
                .map_err(|e| QueueError::Corrupt(format!("redis finish reply: {e}")))?;
            if codes.len() != call_items.len() {
                return Err(QueueError::Corrupt(format!(
                    "redis finish: {} answers for {} items",
                    codes.len(),
                    call_items.len()
                )));
            }
            for (&r, code) in call_items.iter().zip(codes) {
                out[ready[r].index] = Some(Ok(finish_result(code)));
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect())
    }

    /// Runs a batch's finish calls (`pipes`, one `EVALSHA` each) on a single server
    /// with its events: the events as plain `XADD`s ahead of the calls, all in one
    /// pipeline, so they are written before the outcomes, as the cluster's events
    /// are appended before theirs. Each reply is read on its own: an event Redis
    /// refuses (a full Redis) does not stop the outcomes, and marks `events`
    /// unwritten for the caller to append them on their own. Scripts Redis lost
    /// (a restart or failover) are loaded and only the calls sent again, so their
    /// events are not written twice.
    async fn finish_calls_with_events(
        &self,
        pipes: &[Pipeline],
        events: &crate::events::log::OutcomeEvents,
    ) -> Result<Vec<Value>, QueueError> {
        let stream = crate::events::log::stream_key(&self.prefix);
        let mut all = redis::pipe();
        all.ignore_errors();
        for json in events.iter() {
            crate::events::log::push_xadd(&mut all, &stream, json);
        }
        for pipe in pipes {
            for cmd in pipe.cmd_iter() {
                all.add_command(cmd.clone());
            }
        }
        let all = &all;
        let mut replies: Vec<Value> = self
            .retrying(|mut conn| async move { all.query_async(&mut conn).await })
            .await
            .map_err(|e| self.unavailable("finish", e))?;
        if replies.len() != events.len() + pipes.len() {
            return Err(QueueError::Corrupt(format!(
                "redis finish: {} replies for {} events and {} calls",
                replies.len(),
                events.len(),
                pipes.len()
            )));
        }
        let mut calls = replies.split_off(events.len());
        if let Some(Value::ServerError(e)) =
            replies.iter().find(|r| matches!(r, Value::ServerError(_)))
        {
            tracing::debug!(error = %e, "outcome events not written with their outcomes");
            events.mark_unwritten();
        }
        let lost: Vec<usize> = (0..calls.len())
            .filter(|&c| {
                matches!(&calls[c], Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
            })
            .collect();
        if !lost.is_empty() {
            tracing::info!("redis lost the queue scripts; loading them again");
            let again = lost.iter().map(|&c| pipes[c].clone()).collect();
            let answers = self
                .script_per_shard("finish", &self.scripts.finish, again)
                .await?;
            for (c, answer) in lost.into_iter().zip(answers) {
                calls[c] = answer;
            }
        }
        calls
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(e) => Err(self.unavailable("finish", e.into())),
                reply => Ok(reply),
            })
            .collect()
    }

    fn keys(&self, id: &str) -> &ShardKeys {
        self.shard(shard_of(id))
    }

    fn shard(&self, shard: u16) -> &ShardKeys {
        &self.shard_keys[usize::from(shard)]
    }

    fn unavailable(&self, op: &str, e: RedisError) -> QueueError {
        let text = redact(&self.secrets, &format!("redis {op}: {e}"));
        if is_out_of_memory(&e) {
            QueueError::Full(text)
        } else {
            QueueError::Unavailable(text)
        }
    }

    async fn deadline<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(OP_DEADLINE, fut).await {
            Ok(result) => {
                if let Err(e) = &result {
                    tracing::warn!(op, error = %e, "redis queue operation failed");
                }
                result
            }
            Err(_) => {
                tracing::warn!(op, deadline = ?OP_DEADLINE, "redis queue operation timed out");
                Err(QueueError::Timeout(OP_DEADLINE))
            }
        }
    }

    /// Runs `attempt` again once if the connection was dropped or refused: the
    /// connection manager only starts reconnecting when a request fails, so the first
    /// request after an outage fails even when Redis is back. Safe because every write
    /// here is idempotent. A timeout is not retried: the command may have run.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, RedisError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        match attempt(self.conn.clone()).await {
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %redact(&self.secrets, &e.to_string()), "redis connection lost; retrying once");
                tokio::time::sleep(RETRY_DELAY).await;
                attempt(self.conn.clone()).await
            }
            result => result,
        }
    }

    /// Runs a pipeline whose first command is `EVALSHA` of `script`, loading the script
    /// and running it again if Redis lost it (restart, failover, `SCRIPT FLUSH`).
    async fn run_script_pipeline(
        &self,
        pipe: &Pipeline,
        script: &Script,
    ) -> Result<Vec<Value>, RedisError> {
        self.retrying(|mut conn| async move {
            match pipe.query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    tracing::info!("redis lost the queue scripts; loading them again");
                    script.load_async(&mut conn).await?;
                    pipe.query_async(&mut conn).await
                }
                result => result,
            }
        })
        .await
    }

    /// Runs one pipeline per shard and returns each pipeline's replies, in shard
    /// order: all in one pipeline on a single server; in a cluster, concurrent
    /// requests, because shards live on different nodes and a cluster pipeline must
    /// stay within one slot.
    async fn per_shard(
        &self,
        op: &'static str,
        make: impl Fn(&ShardKeys) -> Pipeline,
    ) -> Result<Vec<Vec<Value>>, QueueError> {
        self.per_pipes(op, self.shard_keys.iter().map(make).collect())
            .await
    }

    /// [`Self::per_shard`] over the old layout's shards.
    async fn per_legacy_shard(
        &self,
        op: &'static str,
        make: impl Fn(&LegacyKeys) -> Pipeline,
    ) -> Result<Vec<Vec<Value>>, QueueError> {
        self.per_pipes(op, self.legacy_keys.iter().map(make).collect())
            .await
    }

    /// Runs pipelines that each stay within one slot, returning each one's replies
    /// in order (see [`Self::per_shard`]).
    async fn per_pipes(
        &self,
        op: &'static str,
        pipes: Vec<Pipeline>,
    ) -> Result<Vec<Vec<Value>>, QueueError> {
        match &self.conn {
            Conn::Single(_) | Conn::Sentinel(_) => {
                let mut all = redis::pipe();
                for pipe in &pipes {
                    for cmd in pipe.cmd_iter() {
                        all.add_command(cmd.clone());
                    }
                }
                let mut replies: Vec<Value> = self
                    .retrying(|mut conn| {
                        let all = &all;
                        async move { all.query_async::<Vec<Value>>(&mut conn).await }
                    })
                    .await
                    .map_err(|e| self.unavailable(op, e))?
                    .into_iter()
                    .rev()
                    .collect();
                Ok(pipes
                    .iter()
                    .map(|p| {
                        (0..p.cmd_iter().count())
                            .map_while(|_| replies.pop())
                            .collect()
                    })
                    .collect())
            }
            Conn::Cluster(_) => {
                let mut tasks = tokio::task::JoinSet::new();
                for (i, pipe) in pipes.into_iter().enumerate() {
                    let conn = self.conn.clone();
                    tasks.spawn(async move {
                        let mut conn = conn;
                        (i, pipe.query_async::<Vec<Value>>(&mut conn).await)
                    });
                }
                let mut replies: Vec<(usize, Vec<Value>)> = Vec::with_capacity(tasks.len());
                while let Some(joined) = tasks.join_next().await {
                    let (i, reply) = joined.map_err(|e| {
                        QueueError::Unavailable(format!("redis {op}: task failed: {e}"))
                    })?;
                    replies.push((i, reply.map_err(|e| self.unavailable(op, e))?));
                }
                replies.sort_by_key(|(i, _)| *i);
                Ok(replies.into_iter().map(|(_, r)| r).collect())
            }
        }
    }

    /// Runs pipelines of one `EVALSHA` of `script` each (one per shard), returning
    /// each script's reply in order: merged into one pipeline, so one round trip, on a
    /// single server; concurrently in a cluster, where a pipeline must stay within
    /// one slot and the shards live on different masters.
    async fn script_per_shard(
        &self,
        op: &'static str,
        script: &Script,
        pipes: Vec<Pipeline>,
    ) -> Result<Vec<Value>, QueueError> {
        if pipes.is_empty() {
            return Ok(Vec::new());
        }
        if !self.conn.is_cluster() {
            if let [pipe] = pipes.as_slice() {
                // As it is: merging copies every argument.
                return self
                    .run_script_pipeline(pipe, script)
                    .await
                    .map_err(|e| self.unavailable(op, e));
            }
            let mut all = redis::pipe();
            for pipe in &pipes {
                for cmd in pipe.cmd_iter() {
                    all.add_command(cmd.clone());
                }
            }
            return self
                .run_script_pipeline(&all, script)
                .await
                .map_err(|e| self.unavailable(op, e));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, pipe) in pipes.into_iter().enumerate() {
            let conn = self.conn.clone();
            let script = script.clone();
            tasks.spawn(async move {
                let mut conn = conn;
                let mut result = pipe.query_async::<Vec<Value>>(&mut conn).await;
                if let Err(e) = &result {
                    // Lost scripts (a failover) or a dropped connection: both are safe
                    // to run again, these scripts being idempotent.
                    if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
                        let _ = script.load_async(&mut conn).await;
                        result = pipe.query_async(&mut conn).await;
                    } else if is_connection_error(e) {
                        tokio::time::sleep(RETRY_DELAY).await;
                        result = pipe.query_async(&mut conn).await;
                    }
                }
                (i, result)
            });
        }
        let mut replies: Vec<(usize, Value)> = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (i, reply) = joined
                .map_err(|e| QueueError::Unavailable(format!("redis {op}: task failed: {e}")))?;
            let reply = reply.map_err(|e| self.unavailable(op, e))?;
            replies.push((i, reply.into_iter().next().unwrap_or(Value::Nil)));
        }
        replies.sort_by_key(|(i, _)| *i);
        Ok(replies.into_iter().map(|(_, v)| v).collect())
    }

    /// Runs a script (loading it first if Redis lost it), with the one retry after a
    /// dropped connection.
    async fn eval<T: FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, QueueError> {
        self.retrying(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
            .map_err(|e| self.unavailable(op, e))
    }

    /// The lease's sweep limit for `shards`: [`SWEEP_LIMIT`] when one of them was
    /// last swept [`SWEEP_EVERY_MS`] or more before `now_ms` (or after it: a clock
    /// set back), else 0 (no sweep). Swept together, they are marked together.
    fn sweep_limit(&self, shards: &[u16], now_ms: u64) -> usize {
        let due = |s: &u16| {
            let last = self.last_sweep[usize::from(*s)].load(Ordering::Relaxed);
            now_ms >= last.saturating_add(SWEEP_EVERY_MS) || now_ms < last
        };
        if !shards.iter().any(due) {
            return 0;
        }
        for &s in shards {
            self.last_sweep[usize::from(s)].store(now_ms, Ordering::Relaxed);
        }
        SWEEP_LIMIT
    }

    /// Takes due messages from `shards`, visited in order, with one lease script
    /// call, then reads their stored values and statuses with one `MGET` (in a
    /// cluster `shards` is one shard, so that both stay in its slot).
    ///
    /// The values are read after the lease, outside Lua: a value passed through a
    /// script is copied into a Lua string, which Redis hashes byte by byte. Between
    /// the two round trips the leases are ours, so a value can change only by a
    /// `remove` (gone: not delivered; its lease went with it) or by an enqueue
    /// replacing it under the same id (read new: it is delivered under a lease the
    /// replacement already dropped, so its finish is refused and the new message is
    /// delivered again, an at-least-once duplicate, as when the replacement comes
    /// during delivery). A value missing for another reason is debris (a schedule
    /// entry without its message): its lease is dropped (`lease_drop.lua`).
    async fn lease_shards(
        &self,
        shards: &[u16],
        now_ms: u64,
        expires_ms: u64,
        max: usize,
        token: &str,
    ) -> Result<Taken, QueueError> {
        const KEYS: &str = "due, leased, lease, later, fresh..";
        let sweep = self.sweep_limit(shards, now_ms);
        let mut call = Call::new(&self.scripts.lease, &LEASE);
        for &shard in shards {
            let keys = self.shard(shard);
            call.key(KEYS, &keys.due)
                .key(KEYS, &keys.leased)
                .key(KEYS, &keys.lease)
                .key(KEYS, &keys.later)
                .key(KEYS, &keys.fresh);
        }
        call.arg("now", now_ms)
            .arg("expires", expires_ms)
            .arg("max", max)
            .arg("token", token)
            .arg("sweep limit", sweep)
            .arg(
                "fresh cutoff",
                fresh_cutoff(now_ms.saturating_add(FRESH_SKEW_MS)),
            );
        let invocation = call.invocation();
        // A score is nil for an id taken from `fresh`.
        let flat: Vec<Option<Vec<u8>>> = self.eval("lease", &invocation).await?;
        if !flat.len().is_multiple_of(2) {
            return Err(QueueError::Corrupt(format!(
                "redis lease reply has {} fields",
                flat.len()
            )));
        }
        let mut taken = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            taken.push((
                reply_id(pair[0].as_deref())?,
                parse_score(pair[1].as_deref()),
            ));
        }
        let from = taken
            .iter()
            .fold(0u32, |m, (id, _)| m | 1 << shard_of(id.as_str()));
        let filled = taken.len() >= max;
        let swept = sweep > 0;
        if taken.is_empty() {
            return Ok(Taken {
                leased: Vec::new(),
                from,
                filled,
                swept,
            });
        }
        // Several reads in one pipeline rather than one: a reply of a few
        // megabytes at most each (at 100 KB a message), which the client parses
        // and buffers with less copying than one of a batch's whole size.
        let mut pipe = redis::pipe();
        for chunk in taken.chunks(LEASE_READ_CHUNK) {
            let mget = pipe.cmd("MGET");
            for (id, _) in chunk {
                let keys = self.keys(id.as_str());
                mget.arg(keys.message(id.as_str()))
                    .arg(keys.status(id.as_str()));
            }
        }
        let values: Vec<Vec<Option<Vec<u8>>>> = self
            .retrying(|mut conn| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut conn).await }
            })
            .await
            .map_err(|e| self.unavailable("lease", e))?;
        let values: Vec<Option<Vec<u8>>> = values.into_iter().flatten().collect();
        if values.len() != 2 * taken.len() {
            return Err(QueueError::Corrupt(format!(
                "redis lease read {} values for {} messages",
                values.len(),
                taken.len()
            )));
        }
        let mut out = Vec::with_capacity(taken.len());
        let mut gone = Vec::new();
        let mut values = values.into_iter();
        for (id, score) in taken {
            let (stored, status) = (values.next().flatten(), values.next().flatten());
            let Some(stored) = stored else {
                gone.push(id);
                continue;
            };
            out.push(leased_of(id, score, stored, status, token, expires_ms)?);
        }
        if !gone.is_empty() {
            tracing::warn!(
                count = gone.len(),
                "redis lease: messages gone when read (removed, or schedule entries without a message); not delivered"
            );
            if let Err(e) = self.drop_gone(&gone, token).await {
                tracing::warn!(error = %e, "redis lease: dropping leases of gone messages failed; they expire");
            }
        }
        Ok(Taken {
            leased: out,
            from,
            filled,
            swept,
        })
    }

    /// The shards a lease on a single server visits, from `order` (every shard,
    /// in this call's order): all of them about once a second, else those that
    /// may have mail due (see [`FULL_ROUND_EVERY_MS`]).
    fn shards_to_visit(&self, order: Vec<u16>, now_ms: u64) -> Vec<u16> {
        let last = self.last_full_round.load(Ordering::Relaxed);
        // A clock that went back counts as a second gone.
        if last == u64::MAX || now_ms.abs_diff(last) >= FULL_ROUND_EVERY_MS {
            self.last_full_round.store(now_ms, Ordering::Relaxed);
            return order;
        }
        let busy = self.busy.load(Ordering::Relaxed) | self.home_shard.map_or(0, |s| 1 << s);
        order
            .into_iter()
            .filter(|&s| busy & 1 << s != 0 || self.known_due_by(s, now_ms))
            .collect()
    }

    /// Whether this relay put mail in `shard` that is due by `now_ms`.
    fn known_due_by(&self, shard: u16, now_ms: u64) -> bool {
        let heap = self.known_due[usize::from(shard)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        heap.peek().is_some_and(|t| t.0 <= now_ms)
    }

    /// This relay put mail in `shard` due at `at_ms`.
    fn note_due(&self, shard: u16, at_ms: u64) {
        let mut heap = self.known_due[usize::from(shard)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if heap.len() < KNOWN_DUE_CAP {
            heap.push(std::cmp::Reverse(at_ms));
        }
    }

    /// What a lease over `visited` learnt: a shard it took from may hold more; one
    /// it reached and found empty is empty; one past the shard that filled the
    /// lease was not reached, so it keeps what was known of it.
    fn note_visit(&self, visited: &[u16], now_ms: u64, taken: &Taken) {
        let (reached, unreached) = if taken.filled {
            let last = visited.iter().rposition(|s| taken.from & 1 << s != 0);
            visited.split_at(last.map_or(0, |i| i + 1))
        } else {
            (visited, &[][..])
        };
        let bits = |shards: &[u16]| shards.iter().fold(0u32, |m, s| m | 1 << s);
        // A sweep may have put expired leases back in any shard it was given.
        let unknown = if taken.swept { bits(unreached) } else { 0 };
        self.busy
            .fetch_and(!(bits(reached) & !taken.from), Ordering::Relaxed);
        self.busy.fetch_or(taken.from | unknown, Ordering::Relaxed);
        // What was due by now in a reached shard was taken (or is gone); a shard
        // the lease filled up in stays busy.
        for &s in reached {
            let mut heap = self.known_due[usize::from(s)]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while heap.peek().is_some_and(|t| t.0 <= now_ms) {
                heap.pop();
            }
        }
    }

    /// `shards` may hold mail due now (this relay wrote there): the next lease
    /// visits them.
    fn mark_busy(&self, shards: impl IntoIterator<Item = u16>) {
        let bits = shards.into_iter().fold(0u32, |m, s| m | 1 << s);
        self.busy.fetch_or(bits, Ordering::Relaxed);
    }

    /// Drops our leases of `gone` messages whose values are still absent
    /// (`lease_drop.lua`), one call per shard, in one pipeline.
    async fn drop_gone(&self, gone: &[QueueId], token: &str) -> Result<(), QueueError> {
        let mut by_shard: BTreeMap<u16, Vec<&QueueId>> = BTreeMap::new();
        for id in gone {
            by_shard.entry(shard_of(id.as_str())).or_default().push(id);
        }
        let mut pipes = Vec::new();
        for (shard, ids) in by_shard {
            let keys = self.shard(shard);
            let mut pipe = redis::pipe();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.scripts.lease_drop.get_hash())
                .arg(LEASE_DROP.fixed_keys() + ids.len());
            let mut call = Call::onto(cmd, &LEASE_DROP);
            call.key("due", &keys.due)
                .key("leased", &keys.leased)
                .key("lease", &keys.lease)
                .key("later", &keys.later);
            for id in &ids {
                call.key("message..", keys.message(id.as_str()));
            }
            call.arg("token", token);
            for id in &ids {
                call.arg("id..", id.as_str());
            }
            call.done();
            pipes.push(pipe);
        }
        self.script_per_shard("lease_drop", &self.scripts.lease_drop, pipes)
            .await?;
        Ok(())
    }

    /// Every queued id of a shard (due or in flight), in arrival order.
    async fn shard_ids(&self, keys: &ShardKeys) -> Result<Vec<QueueId>, QueueError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE").arg(&keys.due).arg(0).arg(-1);
        pipe.cmd("ZRANGE").arg(&keys.leased).arg(0).arg(-1);
        pipe.cmd("LRANGE").arg(&keys.fresh).arg(0).arg(-1);
        let (due, leased, fresh): (Vec<String>, Vec<String>, Vec<String>) = self
            .retrying(|mut conn| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut conn).await }
            })
            .await
            .map_err(|e| self.unavailable("list", e))?;
        let mut ids = due
            .iter()
            .chain(&leased)
            .chain(&fresh)
            .map(|s| {
                QueueId::parse(s)
                    .ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {s:?} in redis")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Envelope and status of each of `ids` (one shard's) still queued, in order.
    async fn page(&self, keys: &ShardKeys, ids: &[QueueId]) -> Result<Vec<PageEntry>, QueueError> {
        let mut call = Call::new(&self.scripts.page, &PAGE_LAYOUT);
        call.key("due", &keys.due)
            .key("leased", &keys.leased)
            .arg("message prefix", &keys.message)
            .arg("status prefix", &keys.status);
        for id in ids {
            call.arg("ids..", id.as_str());
        }
        let invocation = call.invocation();
        let flat: Vec<Option<Vec<u8>>> = self.eval("page", &invocation).await?;
        let mut entries = Vec::with_capacity(flat.len() / 5);
        for chunk in flat.chunks(5) {
            let [id, envelope, status, due, leased] = chunk else {
                return Err(QueueError::Corrupt(format!(
                    "redis page reply has {} fields",
                    flat.len()
                )));
            };
            let id = reply_id(id.as_deref())?;
            // Finished or removed since its id was read.
            let Some(envelope) = envelope.as_deref() else {
                continue;
            };
            let envelope = decode_envelope(&id, envelope)?;
            let mut status = stored_status(&id, &envelope, status.as_deref())?;
            let due = parse_score(due.as_deref());
            if due.is_some() {
                status.next_attempt_ms = due;
            }
            status.leased_until_ms = parse_score(leased.as_deref());
            entries.push(PageEntry {
                envelope,
                status,
                due,
            });
        }
        Ok(entries)
    }

    /// Moves messages of the layout before 2026-12 to this one (see the module
    /// docs): one batch per old shard that has any, at most once per
    /// [`MIGRATE_EVERY_MS`] (or [`MIGRATE_IDLE_MS`] after a round that found
    /// nothing); returns how many it moved. An old shard that is empty costs one
    /// small script per round.
    pub async fn migrate_legacy(&self) -> Result<usize, QueueError> {
        let now = now_ms();
        let due = self.next_migration.load(Ordering::Relaxed);
        if now < due
            || self
                .next_migration
                .compare_exchange(
                    due,
                    now + MIGRATE_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return Ok(0);
        }
        let moved = self.migrate_legacy_now().await?;
        if moved == 0 {
            self.next_migration
                .store(now + MIGRATE_IDLE_MS, Ordering::Relaxed);
        }
        Ok(moved)
    }

    /// One move round, whenever it was last run.
    pub async fn migrate_legacy_now(&self) -> Result<usize, QueueError> {
        let now = now_ms();
        let token = lease_token("upgrade");
        let expires = now.saturating_add(MIGRATE_LEASE.as_millis() as u64);
        let pipes: Vec<Pipeline> = self
            .legacy_keys
            .iter()
            .map(|old| {
                let mut pipe = redis::pipe();
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.scripts.legacy_take.get_hash())
                    .arg(LEGACY_TAKE.fixed_keys());
                let mut call = Call::onto(cmd, &LEGACY_TAKE);
                call.key("due", &old.due)
                    .key("leased", &old.leased)
                    .arg("now", now)
                    .arg("expires", expires)
                    .arg("max", MIGRATE_BATCH)
                    .arg("token", &token)
                    .arg("message prefix", old.message(""))
                    .arg("sweep limit", SWEEP_LIMIT);
                call.done();
                pipe
            })
            .collect();
        let taken = self
            .script_per_shard("migrate", &self.scripts.legacy_take, pipes)
            .await?;
        let mut moved = 0;
        for (shard, reply) in taken.into_iter().enumerate() {
            let flat: Vec<Option<Vec<u8>>> = redis::from_redis_value(reply)
                .map_err(|e| QueueError::Corrupt(format!("redis migrate reply: {e}")))?;
            for chunk in flat.chunks(6) {
                let [id, score, envelope, body, status, attempts] = chunk else {
                    return Err(QueueError::Corrupt(format!(
                        "redis migrate reply has {} fields",
                        flat.len()
                    )));
                };
                let id = reply_id(id.as_deref())?;
                let (Some(envelope), Some(body)) = (envelope, body) else {
                    continue;
                };
                let due = parse_score(score.as_deref()).unwrap_or(now);
                let status = match status {
                    Some(json) => {
                        let attempts = std::str::from_utf8(attempts.as_deref().unwrap_or(b"0"))
                            .unwrap_or("0")
                            .to_owned();
                        [attempts.as_bytes(), b":", json].concat()
                    }
                    None => Vec::new(),
                };
                let keys = self.keys(id.as_str());
                let mut call = Call::new(&self.scripts.import, &IMPORT);
                call.key("message", keys.message(id.as_str()))
                    .key("due", &keys.due)
                    .key("stats", &keys.stats)
                    .key("later", &keys.later)
                    .key("status", keys.status(id.as_str()))
                    .key("final", keys.fin(id.as_str()))
                    .arg("id", id.as_str())
                    .arg("stored", Stored { envelope, body })
                    .arg("body length", body.len())
                    .arg("due", due)
                    .arg("status", status);
                let invocation = call.invocation();
                let _stored: i64 = self.eval("migrate", &invocation).await?;
                // Only once the new layout holds it (or held it: final).
                let old = &self.legacy_keys[shard];
                let mut call = Call::new(&self.scripts.legacy_forget, &LEGACY_FORGET);
                call.key("message", old.message(id.as_str()))
                    .key("due", &old.due)
                    .key("leased", &old.leased)
                    .key("ids", &old.ids)
                    .key("stats", &old.stats)
                    .arg("id", id.as_str())
                    .arg("token", &token);
                let invocation = call.invocation();
                moved += self.eval::<i64>("migrate", &invocation).await? as usize;
            }
        }
        if moved > 0 {
            self.mark_busy(0..SHARDS);
            tracing::info!(moved, "moved queued messages from the old redis key layout");
        }
        Ok(moved)
    }
}

impl RedisQueue {
    /// `status` of a message of the old layout: its final record (kept for the
    /// status retention) or, for the moment until it is moved, a queued one.
    async fn legacy_status(
        &self,
        id: &QueueId,
    ) -> Result<Option<(Envelope, MessageStatus)>, QueueError> {
        let key = self.legacy_keys[usize::from(shard_of(id.as_str()))].message(id.as_str());
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg("envelope").arg("status");
        let (envelope, status): (Option<Vec<u8>>, Option<Vec<u8>>) = self
            .retrying(|mut conn| {
                let cmd = &cmd;
                async move { cmd.query_async(&mut conn).await }
            })
            .await
            .map_err(|e| self.unavailable("status", e))?;
        let Some(envelope) = envelope else {
            return Ok(None);
        };
        let envelope: Envelope = decode("envelope", id, Some(&envelope))?;
        let status = match status {
            Some(json) => decode("status", id, Some(&json))?,
            None => MessageStatus::new(&envelope),
        };
        Ok(Some((envelope, status)))
    }
}

/// A queued message as read by [`RedisQueue::page`].
struct PageEntry {
    envelope: Envelope,
    status: MessageStatus,
    /// Its score in `due`; `None` while leased.
    due: Option<u64>,
}

impl Store for RedisQueue {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(self.deadline("ping", async move {
            let cmd = redis::cmd("PING");
            self.retrying(|mut conn| {
                let cmd = &cmd;
                async move { cmd.query_async::<Value>(&mut conn).await }
            })
            .await
            .map_err(|e| self.unavailable("ping", e))?;
            Ok(())
        }))
    }
}

impl Ingest for RedisQueue {
    /// On a single server, an id in this relay's home shard: a group of
    /// enqueues, a lease and a batch of outcomes then touch one shard's indexes
    /// and counters instead of one per message (a command in a script costs Redis
    /// about 10,000 instructions, and a finish of 32 messages spread over 16
    /// shards ran 8 per shard besides the one per message). Spreading buys
    /// nothing on one server; in a cluster ids stay random, so that mail spreads
    /// over the masters.
    fn new_id(&self) -> QueueId {
        match self.home_shard {
            Some(shard) => id_in_shard(shard),
            None => QueueId::generate(),
        }
    }

    /// Grouped with the enqueues of other sessions into one script call (see
    /// `redis_enqueue.rs`); answered once the call that holds the message (and
    /// its `WAIT`) returned.
    fn enqueue<'a>(&'a self, msg: &'a QueuedMessage) -> QueueFuture<'a, ()> {
        Box::pin(self.deadline("enqueue", async move {
            let lane = self.lane(shard_of(valid_id(&msg.envelope.id)?));
            self.enqueue_grouped(lane, msg, None, None).await?;
            Ok(())
        }))
    }

    /// The same transaction stores the message and `XADD`s the event, on standalone
    /// Redis and Sentinel. Not on Cluster: the stream is one key, in another slot
    /// than the message's shard, and one transaction cannot write both (see
    /// docs/events-bounces-suppression.md); the caller then batches the event.
    /// `max_len` is not used: the event sink trims the stream
    /// ([`crate::events::log::TRIM_EVERY`]).
    fn enqueue_with_event<'a>(
        &'a self,
        msg: &'a QueuedMessage,
        event: &'a [u8],
        _max_len: u64,
    ) -> QueueFuture<'a, bool> {
        if self.conn.is_cluster() {
            return Box::pin(async move { self.enqueue(msg).await.map(|()| false) });
        }
        Box::pin(self.deadline("enqueue", async move {
            self.enqueue_grouped(&self.lanes[0], msg, Some(event.to_vec()), None)
                .await?;
            Ok(true)
        }))
    }
}

impl Leasing for RedisQueue {
    fn lease_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        max: usize,
        owner: &str,
    ) -> QueueFuture<'_, Vec<Leased>> {
        let token = lease_token(owner);
        Box::pin(self.deadline("lease_due", async move {
            let mut out: Vec<Leased> = Vec::new();
            if max == 0 {
                return Ok(out);
            }
            // Messages still in the old layout (a rolling upgrade) come over first;
            // a failure there must not stop delivery of the rest.
            if let Err(e) = self.migrate_legacy().await {
                tracing::warn!(error = %e, "redis queue: moving messages from the old key layout failed");
            }
            let expires_ms = now_ms.saturating_add(lease_ms);
            let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
            let order: Vec<u16> = (0..usize::from(SHARDS))
                .map(|i| ((start + i) % usize::from(SHARDS)) as u16)
                .collect();
            if !self.conn.is_cluster() {
                // One server holds every shard: one call visits them all, or those
                // that may have mail.
                let visit = self.shards_to_visit(order, now_ms);
                let taken = self
                    .lease_shards(&visit, now_ms, expires_ms, max, &token)
                    .await?;
                self.note_visit(&visit, now_ms, &taken);
                return Ok(taken.leased);
            }
            // A script's keys must share a slot: one call per shard.
            for shard in order {
                match self
                    .lease_shards(&[shard], now_ms, expires_ms, max - out.len(), &token)
                    .await
                {
                    Ok(taken) => out.extend(taken.leased),
                    // What earlier shards granted is ours now: hand it out rather than
                    // leave it to expire; the failing shard is tried again next call.
                    Err(e) if !out.is_empty() => {
                        tracing::warn!(error = %e, shard, leased = out.len(), "redis lease_due stopped early");
                        break;
                    }
                    Err(e) => return Err(e),
                }
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        }))
    }

    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        status: MessageStatus,
    ) -> QueueFuture<'a, FinishResult> {
        Box::pin(self.deadline("finish", async move {
            let mut answers = self
                .finish_many(vec![(lease.clone(), status)], None)
                .await?;
            answers.pop().expect("one item, one answer")
        }))
    }

    /// One finish script call for the batch (per shard involved in a cluster, sent
    /// at once; per [`FINISH_MAX_ITEMS`] items), in one round trip.
    fn finish_batch(
        &self,
        items: Vec<(Lease, MessageStatus)>,
    ) -> QueueFuture<'_, Vec<Result<FinishResult, QueueError>>> {
        Box::pin(self.deadline("finish", self.finish_many(items, None)))
    }

    /// On standalone Redis and Sentinel. Not on Cluster: the stream is one key, in
    /// another slot than the shards', and one script cannot write both.
    fn writes_outcome_events(&self) -> bool {
        !self.conn.is_cluster()
    }

    /// The events go as plain `XADD`s (uncapped, as [`crate::events::log`]'s own
    /// appends: its sink trims the stream) ahead of the finish script calls, in
    /// their pipeline: see `finish_calls_with_events`.
    fn finish_batch_with_events<'a>(
        &'a self,
        items: Vec<(Lease, MessageStatus)>,
        events: &'a crate::events::log::OutcomeEvents,
    ) -> QueueFuture<'a, Vec<Result<FinishResult, QueueError>>> {
        if self.conn.is_cluster() {
            return Box::pin(async {
                Err(QueueError::Invalid(
                    "the Redis Cluster queue does not write outcome events".into(),
                ))
            });
        }
        Box::pin(self.deadline("finish", self.finish_many(items, Some(events))))
    }

    fn renew<'a>(&'a self, lease: &'a Lease, lease_ms: u64) -> QueueFuture<'a, bool> {
        Box::pin(self.deadline("renew", async move {
            let Some(id) = QueueId::parse(lease.id.as_str()) else {
                return Ok(false);
            };
            let id = id.as_str();
            let keys = self.keys(id);
            let mut call = Call::new(&self.scripts.renew, &RENEW);
            call.key("due", &keys.due)
                .key("leased", &keys.leased)
                .key("lease", &keys.lease)
                .arg("id", id)
                .arg("token", &lease.token)
                .arg("expires", now_ms().saturating_add(lease_ms));
            let invocation = call.invocation();
            let renewed: i64 = self.eval("renew", &invocation).await?;
            Ok(renewed == 1)
        }))
    }

    fn renew_all<'a>(
        &'a self,
        leases: &'a [Lease],
        lease_ms: u64,
    ) -> QueueFuture<'a, Vec<QueueId>> {
        Box::pin(self.deadline("renew_all", async move {
            let expires_ms = now_ms().saturating_add(lease_ms);
            let mut lost = Vec::new();
            let mut pipes = Vec::new();
            for (shard, leases) in by_shard(leases.iter(), &mut lost) {
                let keys = self.shard(shard);
                let mut pipe = redis::pipe();
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.scripts.renew_all.get_hash())
                    .arg(RENEW_ALL.fixed_keys());
                let mut call = Call::onto(cmd, &RENEW_ALL);
                call.key("due", &keys.due)
                    .key("leased", &keys.leased)
                    .key("lease", &keys.lease)
                    .arg("expires", expires_ms);
                for lease in leases {
                    call.arg("id, token..", lease.id.as_str())
                        .arg("id, token..", &lease.token);
                }
                call.done();
                pipes.push(pipe);
            }
            for reply in self
                .script_per_shard("renew_all", &self.scripts.renew_all, pipes)
                .await?
            {
                let ids: Vec<Vec<u8>> = redis::from_redis_value(reply)
                    .map_err(|e| QueueError::Corrupt(format!("redis renew_all reply: {e}")))?;
                for id in ids {
                    lost.push(reply_id(Some(&id))?);
                }
            }
            Ok(lost)
        }))
    }

    fn give_back<'a>(&'a self, leases: &'a [(Lease, u64)]) -> QueueFuture<'a, ()> {
        for (lease, at) in leases {
            self.note_due(shard_of(lease.id.as_str()), *at);
        }
        Box::pin(self.deadline("release", async move {
            let due: std::collections::HashMap<&QueueId, u64> =
                leases.iter().map(|(l, at)| (&l.id, *at)).collect();
            let mut pipes = Vec::new();
            for (shard, leases) in by_shard(leases.iter().map(|(l, _)| l), &mut Vec::new()) {
                let keys = self.shard(shard);
                let mut pipe = redis::pipe();
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.scripts.release.get_hash())
                    .arg(RELEASE.fixed_keys());
                let mut call = Call::onto(cmd, &RELEASE);
                call.key("due", &keys.due)
                    .key("leased", &keys.leased)
                    .key("lease", &keys.lease)
                    .key("later", &keys.later);
                for lease in leases {
                    let at = due.get(&lease.id).copied().unwrap_or_else(now_ms);
                    call.arg("id, token, due..", lease.id.as_str())
                        .arg("id, token, due..", &lease.token)
                        .arg("id, token, due..", at);
                }
                call.done();
                pipes.push(pipe);
            }
            self.script_per_shard("release", &self.scripts.release, pipes)
                .await?;
            Ok(())
        }))
    }
}

impl Inspect for RedisQueue {
    fn get<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<QueuedMessage>> {
        Box::pin(self.deadline("get", async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(None);
            }
            let key = self.keys(id.as_str()).message(id.as_str());
            let mut cmd = redis::cmd("GET");
            cmd.arg(&key);
            let stored: Option<Vec<u8>> = self
                .retrying(|mut conn| {
                    let cmd = &cmd;
                    async move { cmd.query_async(&mut conn).await }
                })
                .await
                .map_err(|e| self.unavailable("get", e))?;
            // A final record is another key: the message is no longer queued.
            let Some(mut body) = stored else {
                return Ok(None);
            };
            let (envelope, body_at) = split_stored(&body)
                .ok_or_else(|| QueueError::Corrupt(format!("message {id} is malformed")))?;
            let envelope = decode_envelope(id, &body[envelope])?;
            body.drain(..body_at);
            Ok(Some(QueuedMessage { envelope, body }))
        }))
    }

    fn list_ids(&self, limit: usize) -> QueueFuture<'_, Vec<QueueId>> {
        Box::pin(self.deadline("list", async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            // Each shard's first `limit` ids include every one of the overall first
            // `limit` that lives in that shard; merge and cut.
            // No arrival index (see the module docs): every queued id, sorted.
            let shards = self
                .per_shard("list", |keys| {
                    let mut pipe = redis::pipe();
                    pipe.cmd("ZRANGE").arg(&keys.due).arg(0).arg(-1);
                    pipe.cmd("ZRANGE").arg(&keys.leased).arg(0).arg(-1);
                    pipe.cmd("LRANGE").arg(&keys.fresh).arg(0).arg(-1);
                    pipe
                })
                .await?;
            let mut ids = Vec::new();
            for reply in shards.into_iter().flatten() {
                let shard_ids: Vec<String> = redis::from_redis_value(reply)
                    .map_err(|e| QueueError::Corrupt(format!("redis list reply: {e}")))?;
                for s in shard_ids {
                    ids.push(QueueId::parse(&s).ok_or_else(|| {
                        QueueError::Corrupt(format!("invalid queue id {s:?} in redis"))
                    })?);
                }
            }
            ids.sort_unstable();
            ids.dedup();
            ids.truncate(limit);
            Ok(ids)
        }))
    }

    fn remove<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, bool> {
        Box::pin(self.deadline("remove", async move {
            if QueueId::parse(id.as_str()).is_none() {
                return Ok(false);
            }
            let id = id.as_str();
            let keys = self.keys(id);
            let mut call = Call::new(&self.scripts.remove, &REMOVE);
            call.key("message", keys.message(id))
                .key("due", &keys.due)
                .key("stats", &keys.stats)
                .key("leased", &keys.leased)
                .key("lease", &keys.lease)
                .key("later", &keys.later)
                .key("status", keys.status(id))
                .key("final", keys.fin(id))
                .key("fresh", &keys.fresh)
                .arg("id", id);
            let invocation = call.invocation();
            let existed: i64 = self.eval("remove", &invocation).await?;
            Ok(existed == 1)
        }))
    }

    fn stats(&self) -> QueueFuture<'_, QueueStats> {
        Box::pin(self.deadline("stats", async move {
            let shards = self
                .per_shard("stats", |keys| {
                    let mut pipe = redis::pipe();
                    pipe.cmd("HMGET")
                        .arg(&keys.stats)
                        .arg("messages")
                        .arg("bytes")
                        .arg("deferred");
                    pipe.cmd("ZCARD").arg(&keys.leased);
                    // The oldest (see the module docs): first by score in `due`,
                    // first of `fresh`, first of `later`, and those in flight.
                    pipe.cmd("ZRANGE").arg(&keys.due).arg(0).arg(0);
                    pipe.cmd("LRANGE").arg(&keys.fresh).arg(0).arg(0);
                    pipe.cmd("ZRANGE").arg(&keys.later).arg(0).arg(0);
                    pipe.cmd("ZRANGE").arg(&keys.leased).arg(0).arg(9999);
                    pipe
                })
                .await?;
            // Messages of the old layout not moved yet (a rolling upgrade).
            let legacy = self
                .per_legacy_shard("stats", |keys| {
                    let mut pipe = redis::pipe();
                    pipe.cmd("HMGET")
                        .arg(&keys.stats)
                        .arg("messages")
                        .arg("bytes")
                        .arg("deferred");
                    pipe.cmd("ZCARD").arg(&keys.leased);
                    pipe.cmd("ZRANGE").arg(&keys.ids).arg(0).arg(0);
                    pipe
                })
                .await?;
            let mut stats = QueueStats::default();
            let sum = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
            let mut oldest = |ids: &[String]| {
                for ms in ids
                    .iter()
                    .filter_map(|s| QueueId::parse(s))
                    .map(|id| id.timestamp_ms())
                {
                    stats.oldest_ms = Some(stats.oldest_ms.map_or(ms, |o| o.min(ms)));
                }
            };
            let mut counts = Vec::new();
            for replies in shards {
                type Shard = (
                    (Option<i64>, Option<i64>, Option<i64>),
                    u64,
                    Vec<String>,
                    Vec<String>,
                    Vec<String>,
                    Vec<String>,
                );
                let (c, leased, due, fresh, later, in_flight): Shard =
                    redis::from_redis_value(Value::Array(replies))
                        .map_err(|e| QueueError::Corrupt(format!("redis stats reply: {e}")))?;
                oldest(&due);
                oldest(&fresh);
                oldest(&later);
                oldest(&in_flight);
                counts.push((c, leased));
            }
            for replies in legacy {
                type Shard = ((Option<i64>, Option<i64>, Option<i64>), u64, Vec<String>);
                let (c, leased, first): Shard = redis::from_redis_value(Value::Array(replies))
                    .map_err(|e| QueueError::Corrupt(format!("redis stats reply: {e}")))?;
                oldest(&first);
                counts.push((c, leased));
            }
            for ((messages, bytes, deferred), leased) in counts {
                stats.messages += sum(messages);
                stats.bytes += sum(bytes);
                stats.deferred += sum(deferred);
                stats.leased += leased;
            }
            Ok(stats)
        }))
    }

    fn delivery_totals(&self) -> QueueFuture<'_, DeliveryTotals> {
        Box::pin(self.deadline("delivery_totals", async move {
            let totals_of = |stats: &str| {
                let mut pipe = redis::pipe();
                pipe.cmd("HMGET")
                    .arg(stats)
                    .arg("delivered")
                    .arg("bounced")
                    .arg("expired");
                pipe
            };
            let mut shards = self
                .per_shard("delivery_totals", |keys| totals_of(&keys.stats))
                .await?;
            // The old layout's totals count too: they never go down.
            shards.extend(
                self.per_legacy_shard("delivery_totals", |keys| totals_of(&keys.stats))
                    .await?,
            );
            let mut totals = DeliveryTotals::default();
            let n = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
            for replies in shards {
                let ((delivered, bounced, expired),): ((Option<i64>, Option<i64>, Option<i64>),) =
                    redis::from_redis_value(Value::Array(replies)).map_err(|e| {
                        QueueError::Corrupt(format!("redis delivery totals reply: {e}"))
                    })?;
                totals.delivered += n(delivered);
                totals.bounced += n(bounced);
                totals.expired += n(expired);
            }
            Ok(totals)
        }))
    }

    fn status<'a>(&'a self, id: &'a QueueId) -> QueueFuture<'a, Option<(Envelope, MessageStatus)>> {
        Box::pin(self.deadline("status", async move {
            let Some(id) = QueueId::parse(id.as_str()) else {
                return Ok(None);
            };
            let keys = self.keys(id.as_str());
            let mut call = Call::new(&self.scripts.status, &STATUS);
            call.key("message", keys.message(id.as_str()))
                .key("due", &keys.due)
                .key("leased", &keys.leased)
                .key("status", keys.status(id.as_str()))
                .key("final", keys.fin(id.as_str()))
                .arg("id", id.as_str());
            let invocation = call.invocation();
            let fields: Vec<Option<Vec<u8>>> = self.eval("status", &invocation).await?;
            let [envelope, status, fin, due, leased] = fields.as_slice() else {
                return Err(QueueError::Corrupt(format!(
                    "redis status reply has {} fields",
                    fields.len()
                )));
            };
            if let Some(envelope) = envelope {
                let envelope = decode_envelope(&id, envelope)?;
                let mut status = stored_status(&id, &envelope, status.as_deref())?;
                if let Some(due) = parse_score(due.as_deref()) {
                    status.next_attempt_ms = Some(due);
                }
                status.leased_until_ms = parse_score(leased.as_deref());
                return Ok(Some((envelope, status)));
            }
            if let Some(record) = fin {
                let (envelope, status) = split_final(record).ok_or_else(|| {
                    QueueError::Corrupt(format!("final record of {id} is malformed"))
                })?;
                let envelope = decode_envelope(&id, envelope)?;
                let status: MessageStatus = decode("status", &id, Some(status))?;
                return Ok(Some((envelope, status)));
            }
            self.legacy_status(&id).await
        }))
    }

    fn list(&self, filter: ListFilter) -> QueueFuture<'_, Vec<(Envelope, MessageStatus)>> {
        Box::pin(self.deadline("list", async move {
            let mut found: Vec<(Envelope, MessageStatus)> = Vec::new();
            if filter.limit == 0 {
                return Ok(found);
            }
            // Each shard contributes its first `limit` matches in arrival order; the
            // overall first `limit` are among them.
            for keys in &self.shard_keys {
                let mut matched = 0;
                for ids in self.shard_ids(keys).await?.chunks(PAGE) {
                    for entry in self.page(keys, ids).await? {
                        if matched < filter.limit && filter.matches(&entry.status) {
                            matched += 1;
                            found.push((entry.envelope, entry.status));
                        }
                    }
                    if matched >= filter.limit {
                        break;
                    }
                }
            }
            found.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            found.truncate(filter.limit);
            Ok(found)
        }))
    }

    fn retry_now(&self, sel: RetrySelector) -> QueueFuture<'_, u64> {
        self.mark_busy(0..SHARDS);
        Box::pin(self.deadline("retry_now", async move {
            let now = now_ms();
            let mut moved: u64 = 0;
            match sel {
                RetrySelector::Id(id) => {
                    if QueueId::parse(id.as_str()).is_none() {
                        return Ok(0);
                    }
                    let keys = self.keys(id.as_str());
                    let mut call = Call::new(&self.scripts.retry_ids, &RETRY_IDS);
                    call.key("due", &keys.due)
                        .arg("now", now)
                        .arg("ids..", id.as_str());
                    let invocation = call.invocation();
                    moved += self.eval::<u64>("retry_now", &invocation).await?;
                }
                RetrySelector::All => {
                    for shard in 0..SHARDS {
                        let keys = self.shard(shard);
                        loop {
                            let mut call = Call::new(&self.scripts.retry_all, &RETRY_ALL);
                            call.key("due", &keys.due)
                                .arg("now", now)
                                .arg("limit", PAGE);
                            let invocation = call.invocation();
                            let n: u64 = self.eval("retry_now", &invocation).await?;
                            moved += n;
                            if n < PAGE as u64 {
                                break;
                            }
                        }
                    }
                }
                RetrySelector::Domain(domain) => {
                    for keys in &self.shard_keys {
                        for ids in self.shard_ids(keys).await?.chunks(PAGE) {
                            let entries = self.page(keys, ids).await?;
                            let ids: Vec<&str> = entries
                                .iter()
                                .filter(|e| {
                                    e.due.is_some_and(|d| d > now)
                                        && e.status.has_pending_in(&domain)
                                })
                                .map(|e| e.envelope.id.as_str())
                                .collect();
                            if !ids.is_empty() {
                                // Checked again inside the script: a message leased
                                // since the page was read is left alone.
                                let mut call = Call::new(&self.scripts.retry_ids, &RETRY_IDS);
                                call.key("due", &keys.due).arg("now", now);
                                for id in ids {
                                    call.arg("ids..", id);
                                }
                                let invocation = call.invocation();
                                moved += self.eval::<u64>("retry_now", &invocation).await?;
                            }
                        }
                    }
                }
            }
            Ok(moved)
        }))
    }
}

/// Leases grouped by shard, in shard order; leases with an id that is not ours
/// (never leased here) go to `invalid`.
fn by_shard<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    invalid: &mut Vec<QueueId>,
) -> BTreeMap<u16, Vec<&'a Lease>> {
    let mut out: BTreeMap<u16, Vec<&Lease>> = BTreeMap::new();
    for lease in leases {
        if QueueId::parse(lease.id.as_str()).is_some() {
            out.entry(shard_of(lease.id.as_str()))
                .or_default()
                .push(lease);
        } else {
            invalid.push(lease.id.clone());
        }
    }
    out
}

fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(value).map_err(|e| QueueError::Corrupt(format!("cannot encode {what}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    id: &impl std::fmt::Display,
    bytes: Option<&[u8]>,
) -> Result<T, QueueError> {
    let bytes = bytes.ok_or_else(|| QueueError::Corrupt(format!("{what} of {id} is missing")))?;
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt(format!("{what} of {id}: {e}")))
}

/// The stored status (`<attempts>:` and its JSON), or a fresh one for a message
/// with no attempt yet.
fn stored_status(
    id: &QueueId,
    envelope: &Envelope,
    bytes: Option<&[u8]>,
) -> Result<MessageStatus, QueueError> {
    match bytes {
        Some(b) => decode(
            "status",
            id,
            Some(status_json(b).ok_or_else(|| {
                QueueError::Corrupt(format!("status of {id} has no attempts count"))
            })?),
        ),
        None => Ok(MessageStatus::new(envelope)),
    }
}

/// A leased message from its stored value (see [`Stored`]) and status.
fn leased_of(
    id: QueueId,
    score: Option<u64>,
    mut body: Vec<u8>,
    status: Option<Vec<u8>>,
    token: &str,
    expires_ms: u64,
) -> Result<Leased, QueueError> {
    let (envelope, body_at) = split_stored(&body)
        .ok_or_else(|| QueueError::Corrupt(format!("message {id} is malformed")))?;
    let head = StoredHead {
        envelope: body[envelope.clone()].to_vec(),
        body_len: (body.len() - body_at) as u64,
    };
    let envelope = decode_envelope(&id, &body[envelope])?;
    // The body is the value's tail: moved to the front, not copied.
    body.drain(..body_at);
    let mut status = stored_status(&id, &envelope, status.as_deref())?;
    // No score: taken from `fresh`, due at its arrival, which is what a message
    // without a status already says.
    if score.is_some() {
        status.next_attempt_ms = score;
    }
    status.leased_until_ms = Some(expires_ms);
    Ok(Leased {
        lease: Lease {
            id,
            token: token.to_owned(),
            expires_ms,
            head: LeaseHead(Some(Arc::new(head))),
        },
        message: QueuedMessage { envelope, body },
        status,
    })
}

/// The finish script's answer.
fn finish_result(code: i64) -> FinishResult {
    match code {
        1 => FinishResult::Rescheduled,
        2 => FinishResult::Finalized,
        _ => FinishResult::LeaseLost,
    }
}

/// The greatest queue id generated at or before `now_ms` (see
/// [`QueueId::generate`]: 48 bits of ms, then 52 random ones, in Crockford base32,
/// whose digits sort as their values): an id of `fresh` is due by `now_ms` iff it
/// sorts at or before this.
fn fresh_cutoff(now_ms: u64) -> String {
    const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let v: u128 = ((u128::from(now_ms & ((1 << 48) - 1))) << 52) | ((1 << 52) - 1);
    (0..20)
        .rev()
        .map(|i| char::from(CROCKFORD[((v >> (i * 5)) & 31) as usize]))
        .collect()
}

fn reply_id(bytes: Option<&[u8]>) -> Result<QueueId, QueueError> {
    let s = std::str::from_utf8(bytes.unwrap_or_default()).unwrap_or_default();
    QueueId::parse(s).ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {s:?} in redis")))
}

/// A sorted-set score as Redis prints it (`1700000000000`, or in exponent form for
/// scores it cannot print exactly as integers).
fn parse_score(bytes: Option<&[u8]>) -> Option<u64> {
    let s = std::str::from_utf8(bytes?).ok()?;
    s.parse::<u64>()
        .ok()
        .or_else(|| s.parse::<f64>().ok().map(|f| f as u64))
}

/// The keys of one shard. All share the shard's hash tag, so one cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardKeys {
    due: String,
    leased: String,
    lease: String,
    later: String,
    /// Ids never attempted, due at their arrival, in arrival order (a list entry
    /// costs far less than a sorted-set one).
    fresh: String,
    stats: String,
    /// `<base>:m:`, `<base>:s:`, `<base>:f:`: a message's keys are these plus its id.
    message: String,
    status: String,
    fin: String,
}

impl ShardKeys {
    /// Every shard's keys, in shard order.
    fn all(prefix: &str) -> Vec<ShardKeys> {
        crate::redis_conn::slots::centred_prefixes(prefix, "q", usize::from(SHARDS))
            .iter()
            .map(|base| ShardKeys {
                due: format!("{base}due"),
                leased: format!("{base}leased"),
                lease: format!("{base}lease"),
                later: format!("{base}later"),
                fresh: format!("{base}fresh"),
                stats: format!("{base}stats"),
                message: format!("{base}m:"),
                status: format!("{base}s:"),
                fin: format!("{base}f:"),
            })
            .collect()
    }

    fn message(&self, id: &str) -> String {
        [self.message.as_str(), id].concat()
    }

    fn status(&self, id: &str) -> String {
        [self.status.as_str(), id].concat()
    }

    fn fin(&self, id: &str) -> String {
        [self.fin.as_str(), id].concat()
    }
}

/// The keys of one shard of the layout before 2026-12 (see the module docs): read
/// only to move its messages over and to answer for its final records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LegacyKeys {
    base: String,
    due: String,
    leased: String,
    ids: String,
    stats: String,
}

impl LegacyKeys {
    fn new(prefix: &str, shard: u16) -> Self {
        let base = format!("{prefix}:{{{prefix}:s{shard:02}}}");
        LegacyKeys {
            due: format!("{base}:due"),
            leased: format!("{base}:leased"),
            ids: format!("{base}:ids"),
            stats: format!("{base}:stats"),
            base,
        }
    }

    fn message(&self, id: &str) -> String {
        format!("{}:m:{id}", self.base)
    }
}

/// The key prefix of each shard (`<prefix>:{<tag>}:`), in shard order: for tests
/// and tools that read the queue's keys directly.
pub fn shard_prefixes(prefix: &str) -> Vec<String> {
    crate::redis_conn::slots::centred_prefixes(prefix, "q", usize::from(SHARDS))
}

/// The key prefix of each shard of the layout before 2026-12
/// (`<prefix>:{<prefix>:sNN}:`), for upgrade tests.
pub fn legacy_shard_prefixes(prefix: &str) -> Vec<String> {
    (0..SHARDS)
        .map(|s| format!("{}:", LegacyKeys::new(prefix, s).base))
        .collect()
}

/// The shard of a queue id (both layouts use the same mapping).
pub fn shard_of_id(id: &str) -> usize {
    usize::from(shard_of(id))
}

/// What a queued message is stored as: `<envelope len>:<body len>:`, the envelope,
/// the body, written straight into the command (no copy of the body first).
struct Stored<'a> {
    envelope: &'a [u8],
    body: &'a [u8],
}

impl redis::ToRedisArgs for Stored<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        // Writing to the command's own buffer cannot fail.
        let _ = write!(w, "{}:{}:", self.envelope.len(), self.body.len());
        let _ = w.write_all(self.envelope);
        let _ = w.write_all(self.body);
    }
}

/// Splits a stored message (see [`Stored`]): the envelope's range and where the
/// body starts. `None` unless the header's lengths add up to the value's.
fn split_stored(value: &[u8]) -> Option<(std::ops::Range<usize>, usize)> {
    let number = |from: usize| -> Option<(usize, usize)> {
        let len = value.get(from..)?.iter().position(|&b| b == b':')?;
        let digits = &value[from..from + len];
        let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
        (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit)).then_some((n, from + len + 1))
    };
    let (env_len, at) = number(0)?;
    let (body_len, start) = number(at)?;
    (start.checked_add(env_len)?.checked_add(body_len)? == value.len())
        .then_some((start..start + env_len, start + env_len))
}

/// The envelope of message `id` as stored (compact, or JSON from the old layout).
fn decode_envelope(id: &QueueId, bytes: &[u8]) -> Result<Envelope, QueueError> {
    envelope_codec::decode(id, bytes)
        .map_err(|e| QueueError::Corrupt(format!("envelope of {id}: {e}")))
}

/// A final record: `<envelope len>:`, the envelope as stored, the status JSON (see
/// [`split_final`]).
fn final_record(envelope: &[u8], status_json: &[u8]) -> Vec<u8> {
    let len = envelope.len().to_string();
    let mut record = Vec::with_capacity(len.len() + 1 + envelope.len() + status_json.len());
    record.extend_from_slice(len.as_bytes());
    record.push(b':');
    record.extend_from_slice(envelope);
    record.extend_from_slice(status_json);
    record
}

/// A final record (`<envelope len>:`, the envelope, the status JSON): its
/// envelope and status.
fn split_final(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = record.iter().position(|&b| b == b':')?;
    let digits = &record[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let rest = &record[colon + 1..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// A status as stored (`<attempts>:` and its JSON): the JSON.
fn status_json(bytes: &[u8]) -> Option<&[u8]> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    bytes[..colon]
        .iter()
        .all(u8::is_ascii_digit)
        .then_some(&bytes[colon + 1..])
}

/// 32-bit FNV-1a: tiny, stable across versions and platforms (unlike std's hasher),
/// which the shard mapping must be.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn shard_of(id: &str) -> u16 {
    (fnv1a(id.as_bytes()) % u32::from(SHARDS)) as u16
}

fn fnv1a_step(h: u32, b: u8) -> u32 {
    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
}

/// A new id that [`shard_of`] puts in `shard`: its last two digits are the first
/// pair, searched from the random ones, that lands there. Both move because from
/// a given 19th digit only 14 of the 16 shards can be reached (no Crockford digit
/// has the low nibble C or F). The choice fixes 4 of the id's 52 random bits; the
/// 48 left make two ids of one millisecond collide with odds of 2^-48.
fn id_in_shard(shard: u16) -> QueueId {
    QueueId::generate_with_tail(|head, random| {
        let digits = QueueId::DIGITS;
        let start = random.map(|r| digits.iter().position(|&d| d == r).unwrap_or(0));
        let h = fnv1a(head);
        for i in 0..digits.len() {
            let a = digits[(start[0] + i) % digits.len()];
            let ha = fnv1a_step(h, a);
            for j in 0..digits.len() {
                let b = digits[(start[1] + j) % digits.len()];
                if fnv1a_step(ha, b) % u32::from(SHARDS) == u32::from(shard) {
                    return [a, b];
                }
            }
        }
        random
    })
}

fn valid_id(id: &QueueId) -> Result<&str, QueueError> {
    QueueId::is_valid(id.as_str())
        .then(|| id.as_str())
        .ok_or_else(|| QueueError::Corrupt(format!("invalid queue id {:?}", id.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn the_group_scripts_offsets_are_their_layouts() {
        // The Lua files cannot read the Rust constants: they must agree. Per
        // message: shard place, id, stored, body length, due, then the event, or
        // the guard's key and argument counts and its arguments.
        let plain = grouped::REPLACE_GROUP.fixed_args();
        assert!(ENQUEUE_REPLACE_MAIN_LUA.contains(&format!("local a, m = {}, ", plain + 1)));
        assert!(ENQUEUE_REPLACE_MAIN_LUA.contains("a, m = a + 5, m + 2"));
        // Per shard: due, stats, leased, lease, later, fresh.
        assert!(ENQUEUE_REPLACE_MAIN_LUA.contains("* 6 + 1"));
        assert!(GUARDED_GROUP_MAIN.contains("* 6 + 1"));
        let guarded = grouped::GUARDED_GROUP.fixed_args();
        assert!(GUARDED_GROUP_MAIN.contains(&format!("local a, m = {}, ", guarded + 1)));
        assert!(GUARDED_GROUP_MAIN.contains("A0 = a + 6\n"));
        assert!(GUARDED_ARGS_LUA.contains("local A0 = 0\n"));
    }

    #[test]
    fn the_fresh_cutoff_sorts_after_ids_of_its_millisecond_and_before_later_ones() {
        let now = now_ms();
        for _ in 0..100 {
            let id = QueueId::generate();
            let ms = id.timestamp_ms();
            assert!(id.as_str() <= fresh_cutoff(ms).as_str());
            assert!(id.as_str() <= fresh_cutoff(ms + 1).as_str());
            assert!(id.as_str() > fresh_cutoff(ms - 1).as_str());
            assert!(ms >= now);
        }
        assert_eq!(
            QueueId::parse(&fresh_cutoff(now)).unwrap().timestamp_ms(),
            now
        );
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9c_f968);
    }

    /// The shard of an id is part of the storage format: if this changes, queued mail
    /// is orphaned after an upgrade.
    #[test]
    fn shard_mapping_is_stable() {
        assert_eq!(SHARDS, 16);
        assert_eq!(shard_of("01J9Z3V5W8X0000000AB"), 1);
        assert_eq!(shard_of("01J9Z3V5W8X0000000AC"), 14);
        assert_eq!(shard_of("7ZZZZZZZZZZZZZZZZZZZ"), 0);
        let counts = (0..1600).fold([0u32; SHARDS as usize], |mut c, _| {
            c[shard_of(QueueId::generate().as_str()) as usize] += 1;
            c
        });
        assert!(counts.iter().all(|&n| n > 40), "uneven spread {counts:?}");
    }

    #[test]
    fn an_id_made_for_a_shard_lands_there_and_stays_random() {
        for shard in 0..SHARDS {
            let before = QueueId::generate().timestamp_ms();
            let ids: Vec<QueueId> = (0..2_000).map(|_| id_in_shard(shard)).collect();
            assert!(
                ids.iter().all(|id| shard_of(id.as_str()) == shard),
                "shard {shard}"
            );
            assert!(ids.iter().all(|id| QueueId::is_valid(id.as_str())));
            assert!(ids.iter().all(|id| id.timestamp_ms() >= before));
            let distinct: std::collections::HashSet<_> = ids.iter().collect();
            assert_eq!(distinct.len(), ids.len(), "shard {shard}");
            // The chosen tails are not a handful of fixed pairs: the search starts
            // from the random digits.
            let tails: std::collections::HashSet<_> =
                ids.iter().map(|id| &id.as_str()[18..]).collect();
            assert!(tails.len() > 300, "shard {shard}: {} tails", tails.len());
        }
    }

    #[test]
    fn keys_of_a_shard_share_one_slot_and_look_as_documented() {
        let all = ShardKeys::all("mr");
        assert_eq!(all.len(), usize::from(SHARDS));
        let keys = &all[7];
        let base = &shard_prefixes("mr")[7];
        assert!(base.starts_with("mr:{mr:q:7."), "{base}");
        assert_eq!(keys.message("ID"), format!("{base}m:ID"));
        assert_eq!(keys.due, format!("{base}due"));
        let slot = Slot::for_key(&keys.due);
        let id = "01J9Z3V5W8X0000000AB";
        for k in [
            keys.message(id),
            keys.status(id),
            keys.fin(id),
            keys.leased.clone(),
            keys.lease.clone(),
            keys.later.clone(),
            keys.stats.clone(),
        ] {
            assert_eq!(Slot::for_key(&k), slot, "{k}");
        }
        let old = LegacyKeys::new("mr", 7);
        assert_eq!(old.message("ID"), "mr:{mr:s07}:m:ID");
        assert_eq!(old.ids, "mr:{mr:s07}:ids");
        assert_eq!(legacy_shard_prefixes("mr")[7], "mr:{mr:s07}:");
    }

    #[test]
    fn shards_spread_over_slots() {
        let slots: std::collections::HashSet<_> = ShardKeys::all("mr")
            .iter()
            .map(|k| format!("{:?}", Slot::for_key(&k.due)))
            .collect();
        assert_eq!(slots.len(), SHARDS as usize);
    }

    #[test]
    fn stored_values_split_back() {
        let cmd = {
            let mut c = redis::cmd("SET");
            c.arg(Stored {
                envelope: b"{\"a\":1}",
                body: b"body:with:colons",
            });
            c
        };
        let packed = cmd.get_packed_command();
        let text = String::from_utf8(packed).unwrap();
        let value = "7:16:{\"a\":1}body:with:colons";
        assert!(
            text.contains(&format!("${}\r\n{value}\r\n", value.len())),
            "{text}"
        );
        let (env, body_at) = split_stored(value.as_bytes()).unwrap();
        assert_eq!(&value[env], "{\"a\":1}");
        assert_eq!(&value[body_at..], "body:with:colons");
        // Lengths that do not add up, or a header that is not two numbers.
        for bad in ["7:17:{\"a\":1}body:with:colons", "x:1:ab", ":0:", "5", ""] {
            assert_eq!(split_stored(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(split_stored(b"0:0:"), Some((4..4, 4)));
        assert_eq!(status_json(b"3:{}"), Some(&b"{}"[..]));
        // A final record's envelope may hold any byte, ':' and '\n' included.
        assert_eq!(
            split_final(b"3:a:\n{\"s\":1}"),
            Some((&b"a:\n"[..], &b"{\"s\":1}"[..]))
        );
        for bad in [&b"9:ab{}"[..], b":ab", b"ab", b"x1:a"] {
            assert_eq!(split_final(bad), None, "{bad:?}");
        }
        assert_eq!(status_json(b"{}"), None);
    }

    #[tokio::test]
    async fn bad_prefix_and_unreachable_server_fail_without_leaking_the_password() {
        let mut cfg = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            password: Some(crate::config::Secret("hunter2".into())),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: "{bad}".into(),
            wait_replicas: 0,
            wait_timeout: crate::config::default_wait_timeout(),
            fresh_list: true,
        };
        assert!(RedisQueue::connect(&cfg).await.is_err());
        cfg.key_prefix = "mr".into();
        let started = std::time::Instant::now();
        let err = RedisQueue::connect(&cfg).await.unwrap_err().to_string();
        assert!(
            started.elapsed() < OP_DEADLINE + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}
