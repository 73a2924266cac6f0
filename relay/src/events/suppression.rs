//! Suppression lists: recipients the relay will not send to again for a while,
//! because mail to them bounced as an invalid recipient (or an operator said so).
//!
//! A list has a name, its scope: `global`, `domain:<sender domain>` or
//! `user:<AUTH user>`. At `RCPT` a recipient is looked up in the tenant's list and
//! the global one, in one store call ([`SuppressionStore::check`]). Entries expire
//! ([`SuppressionConfig::ttl`]); each list keeps at most `max_entries`, dropping the
//! entries closest to expiry first, so memory stays bounded.
//!
//! Stores: [`RedisSuppression`] (shared by every relay process; all lists under one
//! hash tag so that the check of two lists is one script call, in Redis Cluster
//! too), [`EmbeddedSuppression`] (tables in the embedded queue's redb file: one
//! process, kept across restarts) and [`MemorySuppression`] (one process; gone on
//! restart; for tests and relays without a queue file).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};

use crate::config::suppression::{OnSuppressed, SuppressionConfig, SuppressionScope};
use crate::events::classify::Category;
use crate::queue::redis::SharedRedis;
use crate::queue::{Envelope, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("suppression store unavailable: {0}")]
    Unavailable(String),
    #[error("suppression store answered nonsense: {0}")]
    Corrupt(String),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

pub type StoreFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, SuppressionError>> + Send + 'a>>;

/// Why an entry is there, beyond its reason word.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// `manual`, or the bounce category that added it (`invalid_recipient`).
    pub reason: String,
    /// The reply that caused it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The queue id of the message whose bounce added it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    pub added_ms: u64,
}

/// One entry as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub scope: String,
    pub address: String,
    /// `None`: never expires.
    pub expires_ms: Option<u64>,
    #[serde(flatten)]
    pub info: EntryInfo,
}

/// Where suppression entries live.
pub trait SuppressionStore: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    /// The first of `scopes` whose list holds `address` unexpired.
    fn check<'a>(
        &'a self,
        scopes: &'a [String],
        address: &'a str,
    ) -> StoreFuture<'a, Option<usize>>;
    /// Adds or renews `address` on `scope`'s list; `ttl` `None` never expires.
    /// Returns whether it was new.
    fn add<'a>(
        &'a self,
        scope: &'a str,
        address: &'a str,
        ttl: Option<Duration>,
        info: &'a EntryInfo,
        max_entries: u64,
    ) -> StoreFuture<'a, bool>;
    /// Returns whether it was there.
    fn remove<'a>(&'a self, scope: &'a str, address: &'a str) -> StoreFuture<'a, bool>;
    /// Unexpired entries of `scope`'s list, latest expiry first, at most `limit`.
    fn list<'a>(&'a self, scope: &'a str, limit: usize) -> StoreFuture<'a, Vec<Entry>>;
    /// The lists that have (or had) entries.
    fn scopes(&self) -> StoreFuture<'_, Vec<String>>;
}

/// Addresses are compared without case: most mailbox systems ignore it, and a
/// list that differs by case only would let the same dead mailbox through.
pub fn normalize_address(a: &str) -> Result<String, SuppressionError> {
    let a = a.trim().trim_start_matches('<').trim_end_matches('>');
    let ok = a.len() <= 320
        && a.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && !d.is_empty() && !d.contains('@') && !d.starts_with('.')
        })
        && !a.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if !ok {
        return Err(SuppressionError::Invalid {
            field: "address",
            message: format!("{a:?} is not an address like user@example.com"),
        });
    }
    Ok(a.to_lowercase())
}

/// Checks a scope name: `global`, `domain:<domain>` or `user:<name>`.
pub fn normalize_scope(s: &str) -> Result<String, SuppressionError> {
    let bad = |m: String| SuppressionError::Invalid {
        field: "scope",
        message: m,
    };
    let s = s.trim();
    if s == "global" {
        return Ok(s.into());
    }
    let (kind, name) = s.split_once(':').ok_or_else(|| {
        bad(format!(
            "{s:?} is not global, domain:<domain> or user:<AUTH user>"
        ))
    })?;
    if name.is_empty()
        || name.len() > 255
        || name
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'{' || b == b'}')
    {
        return Err(bad(format!(
            "{s:?}: the name after {kind}: is empty or malformed"
        )));
    }
    match kind {
        "domain" => Ok(format!("domain:{}", name.to_ascii_lowercase())),
        "user" => Ok(format!("user:{name}")),
        _ => Err(bad(format!(
            "{s:?}: unknown kind {kind:?} (use global, domain:<domain> or user:<AUTH user>)"
        ))),
    }
}

/// What the session does with a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Suppressed on the list of this scope.
    Suppressed {
        scope: String,
    },
}

/// Suppression as the relay uses it: the store plus the configuration.
pub struct Suppression {
    store: Box<dyn SuppressionStore>,
    cfg: SuppressionConfig,
    categories: Vec<Category>,
}

impl std::fmt::Debug for Suppression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suppression")
            .field("backend", &self.store.backend())
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Suppression {
    pub fn new(store: Box<dyn SuppressionStore>, cfg: SuppressionConfig) -> Self {
        // Validated with the config: unknown names cannot reach here.
        let categories = cfg
            .categories
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        Suppression {
            store,
            cfg,
            categories,
        }
    }

    pub fn store(&self) -> &dyn SuppressionStore {
        &*self.store
    }

    pub fn config(&self) -> &SuppressionConfig {
        &self.cfg
    }

    pub fn on_suppressed(&self) -> OnSuppressed {
        self.cfg.on_suppressed
    }

    /// The tenant's list for a sender and AUTH user under the configured scope.
    pub fn tenant_scope(&self, sender: &str, auth_user: Option<&str>) -> Option<String> {
        let domain = || {
            sender
                .rsplit_once('@')
                .map(|(_, d)| format!("domain:{}", d.to_ascii_lowercase()))
        };
        match self.cfg.scope {
            SuppressionScope::Global => None,
            SuppressionScope::SenderDomain => domain(),
            SuppressionScope::AuthUser => auth_user.map(|u| format!("user:{u}")).or_else(domain),
        }
    }

    /// The recipient check at `RCPT`: one store call over the tenant's list and
    /// the global one.
    pub async fn check(
        &self,
        sender: &str,
        auth_user: Option<&str>,
        recipient: &str,
    ) -> Result<Verdict, SuppressionError> {
        let Ok(address) = normalize_address(recipient) else {
            // Not an address we could ever have listed.
            return Ok(Verdict::Accept);
        };
        let mut scopes = Vec::with_capacity(2);
        if let Some(s) = self.tenant_scope(sender, auth_user) {
            scopes.push(s);
        }
        scopes.push("global".to_owned());
        Ok(match self.store.check(&scopes, &address).await? {
            Some(i) => Verdict::Suppressed {
                scope: scopes.swap_remove(i),
            },
            None => Verdict::Accept,
        })
    }

    /// After a permanent failure of `recipient`: lists it if its category is one
    /// that does (and `auto_add` is on). Returns the scope it went to.
    pub async fn on_bounce(
        &self,
        envelope: &Envelope,
        recipient: &str,
        category: Category,
        reply: &str,
    ) -> Result<Option<String>, SuppressionError> {
        if !self.cfg.auto_add || !self.categories.contains(&category) {
            return Ok(None);
        }
        // Bounces of our own reports have no tenant to protect.
        if envelope.mail.from.is_empty() {
            return Ok(None);
        }
        let Ok(address) = normalize_address(recipient) else {
            return Ok(None);
        };
        let scope = self
            .tenant_scope(&envelope.mail.from, envelope.client.auth_user.as_deref())
            .unwrap_or_else(|| "global".to_owned());
        let info = EntryInfo {
            reason: category.as_str().to_owned(),
            detail: Some(reply.chars().take(300).collect()),
            queue_id: Some(envelope.id.to_string()),
            added_ms: now_ms(),
        };
        self.store
            .add(
                &scope,
                &address,
                Some(self.cfg.ttl),
                &info,
                self.cfg.max_entries,
            )
            .await?;
        Ok(Some(scope))
    }
}

// ---------------------------------------------------------------------------
// In memory

/// One list in memory: address → (expiry ms, why).
type MemoryList = BTreeMap<String, (Option<u64>, EntryInfo)>;

/// One process's lists.
#[derive(Debug, Default)]
pub struct MemorySuppression {
    lists: Mutex<HashMap<String, MemoryList>>,
}

impl MemorySuppression {
    pub fn new() -> Self {
        Self::default()
    }
}

fn ready<'a, T: Send + 'a>(v: Result<T, SuppressionError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

fn live(expires: Option<u64>, now: u64) -> bool {
    expires.is_none_or(|e| e > now)
}

impl SuppressionStore for MemorySuppression {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn check<'a>(
        &'a self,
        scopes: &'a [String],
        address: &'a str,
    ) -> StoreFuture<'a, Option<usize>> {
        let now = now_ms();
        let lists = self.lists.lock().unwrap();
        ready(Ok(scopes.iter().position(|s| {
            lists
                .get(s)
                .and_then(|l| l.get(address))
                .is_some_and(|(e, _)| live(*e, now))
        })))
    }

    fn add<'a>(
        &'a self,
        scope: &'a str,
        address: &'a str,
        ttl: Option<Duration>,
        info: &'a EntryInfo,
        max_entries: u64,
    ) -> StoreFuture<'a, bool> {
        let now = now_ms();
        let mut lists = self.lists.lock().unwrap();
        let list = lists.entry(scope.to_owned()).or_default();
        list.retain(|_, (e, _)| live(*e, now));
        let expires = ttl.map(|t| now.saturating_add(t.as_millis() as u64));
        let new = list
            .insert(address.to_owned(), (expires, info.clone()))
            .is_none();
        while list.len() as u64 > max_entries {
            // The entry closest to expiry (never-expiring ones last).
            let Some(first) = list
                .iter()
                .min_by_key(|(_, (e, _))| e.unwrap_or(u64::MAX))
                .map(|(a, _)| a.clone())
            else {
                break;
            };
            list.remove(&first);
        }
        ready(Ok(new))
    }

    fn remove<'a>(&'a self, scope: &'a str, address: &'a str) -> StoreFuture<'a, bool> {
        let mut lists = self.lists.lock().unwrap();
        ready(Ok(lists
            .get_mut(scope)
            .is_some_and(|l| l.remove(address).is_some())))
    }

    fn list<'a>(&'a self, scope: &'a str, limit: usize) -> StoreFuture<'a, Vec<Entry>> {
        let now = now_ms();
        let lists = self.lists.lock().unwrap();
        let mut out: Vec<Entry> = lists
            .get(scope)
            .into_iter()
            .flatten()
            .filter(|(_, (e, _))| live(*e, now))
            .map(|(a, (e, info))| Entry {
                scope: scope.to_owned(),
                address: a.clone(),
                expires_ms: *e,
                info: info.clone(),
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.expires_ms.unwrap_or(u64::MAX)));
        out.truncate(limit);
        ready(Ok(out))
    }

    fn scopes(&self) -> StoreFuture<'_, Vec<String>> {
        let mut s: Vec<String> = self.lists.lock().unwrap().keys().cloned().collect();
        s.sort();
        ready(Ok(s))
    }
}

// ---------------------------------------------------------------------------
// Embedded (redb)

/// Entries: `(scope, address)` → (expiry ms, [`NEVER`] for none; entry JSON).
const SUP_ENTRIES: redb::TableDefinition<(&str, &str), (u64, &[u8])> =
    redb::TableDefinition::new("suppression");
/// The lists that have (or had) entries, as the Redis store's `scopes` set.
const SUP_SCOPES: redb::TableDefinition<&str, ()> =
    redb::TableDefinition::new("suppression_scopes");
/// The expiry of an entry that never expires.
const NEVER: u64 = u64::MAX;

/// Lists in the embedded queue's redb file (their own tables), so a single-process
/// relay keeps them across restarts. Each write is its own transaction, committed
/// with an fsync: adds come from bounces and operators, not from every message.
/// Expired entries are never found; an add drops its list's expired ones.
#[derive(Clone)]
pub struct EmbeddedSuppression {
    db: std::sync::Arc<redb::Database>,
}

fn db_error(e: impl std::fmt::Display) -> SuppressionError {
    SuppressionError::Unavailable(format!("embedded suppression store: {e}"))
}

impl EmbeddedSuppression {
    /// Creates the tables if missing.
    pub fn open(db: std::sync::Arc<redb::Database>) -> Result<Self, SuppressionError> {
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(SUP_ENTRIES).map_err(db_error)?;
        txn.open_table(SUP_SCOPES).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(EmbeddedSuppression { db })
    }

    /// Runs `f` on the blocking pool (redb reads and fsyncs block).
    fn blocking<'a, T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, SuppressionError> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let db = std::sync::Arc::clone(&self.db);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(|e| SuppressionError::Unavailable(format!("suppression store: {e}")))?
        })
    }
}

impl SuppressionStore for EmbeddedSuppression {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn check<'a>(
        &'a self,
        scopes: &'a [String],
        address: &'a str,
    ) -> StoreFuture<'a, Option<usize>> {
        let scopes = scopes.to_vec();
        let address = address.to_owned();
        self.blocking(move |db| {
            use redb::ReadableDatabase;
            let now = now_ms();
            let txn = db.begin_read().map_err(db_error)?;
            let t = txn.open_table(SUP_ENTRIES).map_err(db_error)?;
            for (i, s) in scopes.iter().enumerate() {
                if let Some(v) = t.get((s.as_str(), address.as_str())).map_err(db_error)?
                    && v.value().0 > now
                {
                    return Ok(Some(i));
                }
            }
            Ok(None)
        })
    }

    fn add<'a>(
        &'a self,
        scope: &'a str,
        address: &'a str,
        ttl: Option<Duration>,
        info: &'a EntryInfo,
        max_entries: u64,
    ) -> StoreFuture<'a, bool> {
        let json = match serde_json::to_vec(info) {
            Ok(j) => j,
            Err(e) => {
                return ready(Err(SuppressionError::Corrupt(format!(
                    "cannot encode the entry: {e}"
                ))));
            }
        };
        let scope = scope.to_owned();
        let address = address.to_owned();
        self.blocking(move |db| {
            use redb::ReadableTable;
            let now = now_ms();
            let expires = ttl.map_or(NEVER, |t| now.saturating_add(t.as_millis() as u64));
            let txn = db.begin_write().map_err(db_error)?;
            let new = {
                let mut t = txn.open_table(SUP_ENTRIES).map_err(db_error)?;
                txn.open_table(SUP_SCOPES)
                    .map_err(db_error)?
                    .insert(scope.as_str(), ())
                    .map_err(db_error)?;
                let new = t
                    .insert(
                        (scope.as_str(), address.as_str()),
                        (expires, json.as_slice()),
                    )
                    .map_err(db_error)?
                    .is_none();
                // The list's entries by expiry: drop the expired, then the ones
                // closest to expiry while over the cap (never-expiring ones last).
                let mut live: Vec<(u64, String)> = Vec::new();
                let mut dead: Vec<String> = Vec::new();
                for row in t.range((scope.as_str(), "")..).map_err(db_error)? {
                    let (k, v) = row.map_err(db_error)?;
                    let (s, a) = k.value();
                    if s != scope {
                        break;
                    }
                    let e = v.value().0;
                    if e > now {
                        live.push((e, a.to_owned()));
                    } else {
                        dead.push(a.to_owned());
                    }
                }
                if live.len() as u64 > max_entries {
                    live.sort_unstable();
                    let over = live.len() - max_entries as usize;
                    dead.extend(live.into_iter().take(over).map(|(_, a)| a));
                }
                for a in &dead {
                    t.remove((scope.as_str(), a.as_str())).map_err(db_error)?;
                }
                new
            };
            txn.commit().map_err(db_error)?;
            Ok(new)
        })
    }

    fn remove<'a>(&'a self, scope: &'a str, address: &'a str) -> StoreFuture<'a, bool> {
        let scope = scope.to_owned();
        let address = address.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_error)?;
            let was = {
                let mut t = txn.open_table(SUP_ENTRIES).map_err(db_error)?;
                // Like the other stores: whether it was there, expired or not.
                t.remove((scope.as_str(), address.as_str()))
                    .map_err(db_error)?
                    .is_some()
            };
            txn.commit().map_err(db_error)?;
            Ok(was)
        })
    }

    fn list<'a>(&'a self, scope: &'a str, limit: usize) -> StoreFuture<'a, Vec<Entry>> {
        let scope = scope.to_owned();
        self.blocking(move |db| {
            use redb::ReadableDatabase;
            let now = now_ms();
            let txn = db.begin_read().map_err(db_error)?;
            let t = txn.open_table(SUP_ENTRIES).map_err(db_error)?;
            let mut out = Vec::new();
            for row in t.range((scope.as_str(), "")..).map_err(db_error)? {
                let (k, v) = row.map_err(db_error)?;
                let (s, a) = k.value();
                if s != scope {
                    break;
                }
                let (e, json) = v.value();
                if e <= now {
                    continue;
                }
                out.push(Entry {
                    scope: scope.clone(),
                    address: a.to_owned(),
                    expires_ms: (e != NEVER).then_some(e),
                    info: serde_json::from_slice(json).unwrap_or_default(),
                });
            }
            out.sort_by_key(|e| std::cmp::Reverse(e.expires_ms.unwrap_or(u64::MAX)));
            out.truncate(limit);
            Ok(out)
        })
    }

    fn scopes(&self) -> StoreFuture<'_, Vec<String>> {
        self.blocking(|db| {
            use redb::{ReadableDatabase, ReadableTable};
            let txn = db.begin_read().map_err(db_error)?;
            let t = txn.open_table(SUP_SCOPES).map_err(db_error)?;
            let mut s = Vec::new();
            for row in t.iter().map_err(db_error)? {
                s.push(row.map_err(db_error)?.0.value().to_owned());
            }
            Ok(s)
        })
    }
}

// ---------------------------------------------------------------------------
// Redis

const CHECK_LUA: &str = include_str!("lua/suppression_check.lua");
const ADD_LUA: &str = include_str!("lua/suppression_add.lua");
const REMOVE_LUA: &str = include_str!("lua/suppression_remove.lua");
const LIST_LUA: &str = include_str!("lua/suppression_list.lua");
const SCOPES_LUA: &str = include_str!("lua/suppression_scopes.lua");

/// Every script by name (for the Lua lint).
pub fn lua_scripts() -> Vec<(&'static str, String)> {
    vec![
        ("suppression_check", CHECK_LUA.to_owned()),
        ("suppression_add", ADD_LUA.to_owned()),
        ("suppression_remove", REMOVE_LUA.to_owned()),
        ("suppression_list", LIST_LUA.to_owned()),
        ("suppression_scopes", SCOPES_LUA.to_owned()),
    ]
}

/// Lists in Redis. Keys, all under the tag `{<prefix>:sup}` (one Cluster slot):
/// `…:z:<scope>` a sorted set (address → expiry ms, `+inf` for never),
/// `…:m:<scope>` a hash (address → entry JSON), `…:scopes` the set of list names.
pub struct RedisSuppression {
    redis: SharedRedis,
    check: Script,
    add: Script,
    remove: Script,
    list: Script,
    scopes: Script,
}

impl RedisSuppression {
    pub async fn new(redis: SharedRedis) -> Result<Self, SuppressionError> {
        let s = RedisSuppression {
            check: Script::new(CHECK_LUA),
            add: Script::new(ADD_LUA),
            remove: Script::new(REMOVE_LUA),
            list: Script::new(LIST_LUA),
            scopes: Script::new(SCOPES_LUA),
            redis,
        };
        for script in [&s.check, &s.add, &s.remove, &s.list, &s.scopes] {
            s.redis
                .load(script)
                .await
                .map_err(SuppressionError::Unavailable)?;
        }
        Ok(s)
    }

    fn tag(&self) -> String {
        format!("{{{}:sup}}", self.redis.prefix())
    }

    fn zset(&self, scope: &str) -> String {
        format!("{}:z:{scope}", self.tag())
    }

    fn hash(&self, scope: &str) -> String {
        format!("{}:m:{scope}", self.tag())
    }
}

fn unavailable(e: String) -> SuppressionError {
    SuppressionError::Unavailable(e)
}

impl SuppressionStore for RedisSuppression {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn check<'a>(
        &'a self,
        scopes: &'a [String],
        address: &'a str,
    ) -> StoreFuture<'a, Option<usize>> {
        Box::pin(async move {
            let mut inv = self.check.prepare_invoke();
            for s in scopes {
                inv.key(self.zset(s));
            }
            inv.arg(address);
            let i: i64 = self.redis.invoke(&inv).await.map_err(unavailable)?;
            Ok(usize::try_from(i)
                .ok()
                .filter(|i| (1..=scopes.len()).contains(i))
                .map(|i| i - 1))
        })
    }

    fn add<'a>(
        &'a self,
        scope: &'a str,
        address: &'a str,
        ttl: Option<Duration>,
        info: &'a EntryInfo,
        max_entries: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let json = serde_json::to_string(info)
                .map_err(|e| SuppressionError::Corrupt(format!("cannot encode the entry: {e}")))?;
            let mut inv = self.add.prepare_invoke();
            inv.key(self.zset(scope))
                .key(self.hash(scope))
                .key(format!("{}:scopes", self.tag()))
                .arg(address)
                .arg(ttl.map_or(0, |t| t.as_millis().max(1) as u64))
                .arg(json)
                .arg(scope)
                .arg(max_entries);
            let (new, _, _): (i64, i64, i64) =
                self.redis.invoke(&inv).await.map_err(unavailable)?;
            Ok(new == 1)
        })
    }

    fn remove<'a>(&'a self, scope: &'a str, address: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut inv = self.remove.prepare_invoke();
            inv.key(self.zset(scope)).key(self.hash(scope)).arg(address);
            let n: i64 = self.redis.invoke(&inv).await.map_err(unavailable)?;
            Ok(n == 1)
        })
    }

    fn list<'a>(&'a self, scope: &'a str, limit: usize) -> StoreFuture<'a, Vec<Entry>> {
        Box::pin(async move {
            let mut inv = self.list.prepare_invoke();
            inv.key(self.zset(scope)).key(self.hash(scope)).arg(limit);
            let flat: Vec<redis::Value> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            let text = |v: &redis::Value| -> Result<String, SuppressionError> {
                redis::from_redis_value::<String>(v.clone())
                    .map_err(|e| SuppressionError::Corrupt(e.to_string()))
            };
            let mut out = Vec::new();
            for row in flat.get(1..).unwrap_or_default().chunks(3) {
                let [a, e, j] = row else {
                    return Err(SuppressionError::Corrupt("short list row".into()));
                };
                let expiry: f64 = text(e)?
                    .parse()
                    .map_err(|_| SuppressionError::Corrupt("expiry".into()))?;
                let info: EntryInfo = serde_json::from_str(&text(j)?).unwrap_or_default();
                out.push(Entry {
                    scope: scope.to_owned(),
                    address: text(a)?,
                    expires_ms: (expiry >= 0.0).then_some(expiry as u64),
                    info,
                });
            }
            Ok(out)
        })
    }

    fn scopes(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut inv = self.scopes.prepare_invoke();
            inv.key(format!("{}:scopes", self.tag()));
            let mut s: Vec<String> = self.redis.invoke(&inv).await.map_err(unavailable)?;
            s.sort();
            Ok(s)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_scopes_are_normalised_or_refused_naming_the_field() {
        assert_eq!(
            normalize_address("<Bob@Example.NET>").unwrap(),
            "bob@example.net"
        );
        for bad in ["", "bob", "@x", "a@", "a b@x", "a@b@c"] {
            let e = normalize_address(bad).unwrap_err();
            assert!(e.to_string().contains("invalid address"), "{bad}: {e}");
        }
        assert_eq!(normalize_scope("global").unwrap(), "global");
        assert_eq!(
            normalize_scope("domain:Example.COM").unwrap(),
            "domain:example.com"
        );
        assert_eq!(normalize_scope("user:Alice").unwrap(), "user:Alice");
        for bad in ["tenant:x", "domain:", "everyone", "user:a{b}"] {
            let e = normalize_scope(bad).unwrap_err();
            assert!(e.to_string().contains("invalid scope"), "{bad}: {e}");
        }
    }

    fn info() -> EntryInfo {
        EntryInfo {
            reason: "manual".into(),
            ..EntryInfo::default()
        }
    }

    #[tokio::test]
    async fn the_memory_store_checks_expires_and_caps() {
        checks_expires_and_caps(&MemorySuppression::new()).await;
    }

    #[tokio::test]
    async fn the_embedded_store_checks_expires_caps_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        {
            let db = std::sync::Arc::new(redb::Database::create(&path).unwrap());
            checks_expires_and_caps(&EmbeddedSuppression::open(db).unwrap()).await;
        }
        let db = std::sync::Arc::new(redb::Database::create(&path).unwrap());
        let m = EmbeddedSuppression::open(db).unwrap();
        let scopes = vec!["domain:a.test".to_owned(), "global".to_owned()];
        assert_eq!(m.check(&scopes, "x@b.test").await.unwrap(), Some(0));
        assert_eq!(m.list("domain:c.test", 10).await.unwrap().len(), 2);
        assert_eq!(
            m.scopes().await.unwrap(),
            ["domain:a.test", "domain:c.test", "global"]
        );
    }

    async fn checks_expires_and_caps(m: &dyn SuppressionStore) {
        let scopes = vec!["domain:a.test".to_owned(), "global".to_owned()];
        assert_eq!(m.check(&scopes, "x@b.test").await.unwrap(), None);
        assert!(
            m.add("global", "x@b.test", None, &info(), 10)
                .await
                .unwrap()
        );
        assert_eq!(m.check(&scopes, "x@b.test").await.unwrap(), Some(1));
        m.add(
            "domain:a.test",
            "x@b.test",
            Some(Duration::from_secs(60)),
            &info(),
            10,
        )
        .await
        .unwrap();
        assert_eq!(m.check(&scopes, "x@b.test").await.unwrap(), Some(0));
        assert!(m.remove("global", "x@b.test").await.unwrap());
        assert!(!m.remove("global", "x@b.test").await.unwrap());
        // Expired entries are not found.
        m.add(
            "global",
            "y@b.test",
            Some(Duration::from_millis(1)),
            &info(),
            10,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(m.check(&scopes, "y@b.test").await.unwrap(), None);
        // The cap drops the entry closest to expiry.
        for (i, secs) in [30u64, 10, 20].into_iter().enumerate() {
            m.add(
                "domain:c.test",
                &format!("{i}@b.test"),
                Some(Duration::from_secs(secs)),
                &info(),
                2,
            )
            .await
            .unwrap();
        }
        let listed: Vec<String> = m
            .list("domain:c.test", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.address)
            .collect();
        assert_eq!(listed, ["0@b.test", "2@b.test"]);
    }
}
