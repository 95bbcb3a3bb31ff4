//! The shared backend: Redis (or Valkey, ElastiCache, MemoryDB), through redis-rs.
//!
//! **Layout.** A scope's values are one hash and its key order one sorted set (members at score 0
//! sort by bytes, which is what `list` reads); an idempotency record is a string with a 24 h
//! expiry; a key's rate-limit window is a small hash. Every key of a scope carries the same hash
//! tag (`{…}`, from a digest of the scope), so each atomic step touches one cluster slot.
//!
//! **Atomic steps.** `incr` (with or without an idempotency record) and `admit` are Lua scripts:
//! one round trip, run by Redis as one step, so no other client sees half of one. `set` and
//! `delete` are `MULTI`/`EXEC` pairs. Integers are Redis's own exact 64-bit `HINCRBY` (a Lua
//! number is a double, so no arithmetic is done in Lua on values).
//!
//! **Durability** (what an acknowledgement means), by `state_wait_replicas`:
//! - `0` (default): Redis's own policy. With AOF and `appendfsync always` Redis writes and fsyncs
//!   a command before it replies, so an acknowledged write survives `kill -9` and power loss of
//!   that node; MemoryDB acknowledges a write once its multi-AZ transaction log has it. Without
//!   AOF (plain ElastiCache), a crash can lose the last writes: the gateway warns at startup.
//! - `N > 0`: after every write, `WAIT N` — the write is acknowledged once N replicas have it in
//!   memory (a failover to any of them keeps it), or the request fails with 503 if they do not
//!   answer within `state_timeout_ms`.
//!
//! **Failure.** Every operation has `state_timeout_ms`; an unreachable or slow Redis is a
//! [`StateError::Unavailable`] (503 `state_unavailable`), never a hang. redis-rs's
//! `ConnectionManager` reconnects by itself, so service resumes when Redis is back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, Script};
use serde_json::Value;

use super::{
    decode_value, Admission, Item, RateLimits, StateError, IDEMPOTENCY_TTL_SECS, RATE_WINDOW_MS,
};

/// How to reach Redis, from the gateway's settings.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://HOST:PORT/DB` or `rediss://HOST:PORT/DB` (TLS).
    pub url: String,
    /// ACL user (Redis 6+); the password alone authenticates as `default`.
    pub username: Option<String>,
    /// A file holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify a `rediss://` server; default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Replicas that must have each write before it is acknowledged (`WAIT`); 0: Redis's own
    /// policy.
    pub wait_replicas: u32,
    /// Longest any one operation may take, connecting included.
    pub timeout: Duration,
    /// Connections kept open, used in turn (each is pipelined).
    pub pool: usize,
    /// A cluster-mode deployment (MemoryDB, a Redis Cluster): `url` is one node; the client
    /// learns the rest and routes each step to its slot's primary.
    pub cluster: bool,
}

/// One pipelined connection: to a single server, or to a whole cluster. Both reconnect by
/// themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Vec<Conn>,
    next: AtomicUsize,
    wait_replicas: u32,
    timeout: Duration,
    describe: String,
    scripts: Scripts,
}

struct Scripts {
    incr: Script,
    list: Script,
    admit: Script,
}

/// Adds with `HINCRBY` (exact, refuses overflow and non-integers, changes nothing then), keeps
/// the key in the scope's order, and with an idempotency record (KEYS[3]) applies at most once.
/// Answers `{status, text}`: `ok` and the value as text (exact past 2^53), `conflict` and the
/// first `by`, or `invalid` and Redis's reason.
const INCR: &str = r"
if KEYS[3] then
  local rec = redis.call('GET', KEYS[3])
  if rec then
    local sp = string.find(rec, ' ', 1, true)
    local by = string.sub(rec, 1, sp - 1)
    if by ~= ARGV[2] then return {'conflict', by} end
    return {'ok', string.sub(rec, sp + 1)}
  end
end
local r = redis.pcall('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if type(r) == 'table' and r.err then return {'invalid', r.err} end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local v = redis.call('HGET', KEYS[1], ARGV[1])
if KEYS[3] then redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. v, 'EX', ARGV[3]) end
return {'ok', v}
";

/// Keys of the scope's order between two bounds, with their values, as one flat array.
const LIST: &str = r"
local ks = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
if #ks == 0 then return {} end
local vs = redis.call('HMGET', KEYS[2], unpack(ks))
local out = {}
for i, k in ipairs(ks) do
  if vs[i] then out[#out + 1] = k; out[#out + 1] = vs[i] end
end
return out
";

/// One fixed window per minute on Redis's clock (so gateways' clocks do not matter): allowed
/// only if neither limit (0 = none) would be passed, and then counted. Answers
/// `{allowed, requests, tokens, ms until the window resets}`.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local span = tonumber(ARGV[4])
local win = math.floor(now / span)
local rl, tl, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'w', 'r', 't')
local r, tk = 0, 0
if tonumber(h[1]) == win then r = tonumber(h[2]) or 0; tk = tonumber(h[3]) or 0 end
local ok = 1
if rl > 0 and r + 1 > rl then ok = 0 end
if tl > 0 and tk + cost > tl then ok = 0 end
if ok == 1 then
  r = r + 1
  tk = tk + cost
  redis.call('HSET', KEYS[1], 'w', win, 'r', r, 't', tk)
  redis.call('PEXPIRE', KEYS[1], span * 2)
end
return {ok, r, tk, (win + 1) * span - now}
";

const TRIGGERS: &str = "meshd:triggers";

/// The keys of one scope, sharing one hash tag.
struct ScopeKeys {
    values: Vec<u8>,
    order: Vec<u8>,
    tag: String,
}

fn scope_keys(scope: &str) -> ScopeKeys {
    let digest = crate::config::sha256(scope.as_bytes());
    let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let key = |kind: &str| {
        let mut k = format!("meshd:{{{tag}}}:{kind}:").into_bytes();
        k.extend_from_slice(scope.as_bytes());
        k
    };
    ScopeKeys {
        values: key("v"),
        order: key("k"),
        tag,
    }
}

fn idempotency_record(scope: &str, key: &str, idempotency_key: &str) -> Vec<u8> {
    let tag = scope_keys(scope).tag;
    // The scope has no NUL; the key's length is written out, so no two (key, idempotency key)
    // pairs give the same name.
    let mut k = format!("meshd:{{{tag}}}:i:").into_bytes();
    k.extend_from_slice(scope.as_bytes());
    k.extend_from_slice(format!("\0{}:", key.len()).as_bytes());
    k.extend_from_slice(key.as_bytes());
    k.extend_from_slice(idempotency_key.as_bytes());
    k
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    pub async fn connect(opts: RedisOptions) -> Result<RedisStore, StateError> {
        let invalid = |m: String| StateError::Invalid(m);
        let mut info = opts
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid(format!("state_url: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &opts.username {
            settings = settings.set_username(user);
        }
        if let Some(path) = &opts.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(format!(
                    "cannot read state_password_file {}: {e}",
                    path.display()
                ))
            })?;
            let password = text.lines().next().unwrap_or("").trim();
            if password.is_empty() {
                return Err(invalid(format!(
                    "state_password_file {} is empty",
                    path.display()
                )));
            }
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        let secure = opts.url.starts_with("rediss://");
        let root = match (&opts.ca_file, secure) {
            (Some(ca), true) => Some(std::fs::read(ca).map_err(|e| {
                invalid(format!("cannot read state_ca_file {}: {e}", ca.display()))
            })?),
            (Some(_), false) => {
                return Err(invalid(
                    "state_ca_file is set but state_url is not rediss:// (TLS)".into(),
                ))
            }
            (None, _) => None,
        };
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: root.clone(),
        };
        let pool = if opts.cluster {
            if opts.wait_replicas > 0 {
                return Err(invalid(
                    "state_wait_replicas does not apply to a cluster (its own log or replication is the policy)"
                        .into(),
                ));
            }
            let mut builder = redis::cluster::ClusterClientBuilder::new(vec![info])
                .connection_timeout(opts.timeout)
                .response_timeout(opts.timeout)
                .retries(2);
            if root.is_some() {
                builder = builder.certs(certs());
            }
            let client = builder
                .build()
                .map_err(|e| invalid(format!("state_url: {e}")))?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(opts.timeout)
                .set_response_timeout(opts.timeout);
            // One cluster connection multiplexes every node; more add nothing.
            vec![Conn::Cluster(
                client.get_pending_async_connection_with_config(config),
            )]
        } else {
            let client = match root {
                Some(_) => redis::Client::build_with_tls(info, certs()),
                None => redis::Client::open(info),
            }
            .map_err(|e| invalid(format!("state_url: {e}")))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(opts.timeout))
                .set_response_timeout(Some(opts.timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            (0..opts.pool.max(1))
                .map(|_| {
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                        .map(Conn::Single)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("state_url: {e}")))?
        };
        let host = opts
            .url
            .split_once("://")
            .map(|(_, rest)| rest.rsplit('@').next().unwrap_or(rest))
            .unwrap_or(&opts.url);
        let policy = if opts.wait_replicas > 0 {
            format!("WAIT for {} replicas", opts.wait_replicas)
        } else {
            "the server's own durability policy".to_string()
        };
        let kind = if opts.cluster {
            "redis cluster"
        } else {
            "redis"
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                pool,
                next: AtomicUsize::new(0),
                wait_replicas: opts.wait_replicas,
                timeout: opts.timeout,
                describe: format!(
                    "{kind} at {}{host} (acknowledged under {policy})",
                    if secure { "rediss://" } else { "redis://" }
                ),
                scripts: Scripts {
                    incr: Script::new(INCR),
                    list: Script::new(LIST),
                    admit: Script::new(ADMIT),
                },
            }),
        };
        store.check_policy().await;
        Ok(store)
    }

    pub fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    /// Says at startup what an acknowledgement will mean, and warns when it means little.
    async fn check_policy(&self) {
        let mut conn = self.conn();
        // One round trip, under the deadline: `append*` names both settings on every version.
        let mut ask = redis::cmd("CONFIG");
        ask.arg("GET").arg("append*");
        let asked = ask.query_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(self.inner.timeout, asked).await {
            Err(_) => tracing::warn!(
                "redis did not answer at startup; the state API answers 503 until it does"
            ),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() => {
                tracing::warn!(error = %e, "redis is unreachable at startup; the state API answers 503 until it is back")
            }
            // MemoryDB and some managed services refuse CONFIG: their log is their policy.
            Ok(Err(e)) => tracing::info!(error = %e, "cannot read redis's fsync policy"),
            Ok(Ok(pairs)) => {
                let setting = |name: &str| {
                    pairs
                        .chunks_exact(2)
                        .find(|kv| kv[0] == name)
                        .map_or("", |kv| kv[1].as_str())
                };
                let (aof, fsync) = (setting("appendonly"), setting("appendfsync"));
                if self.inner.wait_replicas == 0 && (aof != "yes" || fsync != "always") {
                    tracing::warn!(
                        appendonly = %aof, appendfsync = %fsync,
                        "redis is not set to fsync every write (appendonly yes, appendfsync always) \
                         and state_wait_replicas is 0: a crash of redis can lose acknowledged writes"
                    );
                } else {
                    tracing::info!(appendonly = %aof, appendfsync = %fsync, wait_replicas = self.inner.wait_replicas, "redis durability policy");
                }
            }
        }
    }

    fn conn(&self) -> Conn {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.pool[i % self.inner.pool.len()].clone()
    }

    /// Runs one operation under the deadline; any Redis failure is `Unavailable`.
    async fn run<T, F>(&self, op: F) -> Result<T, StateError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.inner.timeout, op).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StateError::Unavailable(format!(
                "redis did not answer within {} ms",
                self.inner.timeout.as_millis()
            ))),
        }
    }

    /// Runs a write and, with `wait_replicas`, `WAIT`s on the same connection: the write is
    /// acknowledged only once that many replicas have it.
    async fn write<T, F, Fut>(&self, op: F) -> Result<T, StateError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn();
        let wait = self.inner.wait_replicas;
        // Half the operation's time: the answer (too few replicas) must come back within it.
        let timeout_ms = (self.inner.timeout.as_millis() as u64 / 2).max(1);
        let mut waiter = conn.clone();
        self.run(async move {
            let out = op(conn).await?;
            if wait > 0 {
                let got: u32 = redis::cmd("WAIT")
                    .arg(wait)
                    .arg(timeout_ms)
                    .query_async(&mut waiter)
                    .await?;
                if got < wait {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "too few replicas",
                        format!(
                            "{got} of {wait} replicas acknowledged the write in {timeout_ms} ms"
                        ),
                    )));
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn get(&self, scope: &str, key: &str) -> Result<Option<Value>, StateError> {
        let k = scope_keys(scope);
        let mut conn = self.conn();
        let raw: Option<Vec<u8>> = self
            .run(
                redis::cmd("HGET")
                    .arg(&k.values)
                    .arg(key)
                    .query_async(&mut conn),
            )
            .await?;
        raw.map(|v| decode_value(&v)).transpose()
    }

    pub async fn set(&self, scope: &str, key: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        let k = scope_keys(scope);
        self.write(|mut conn| async move {
            redis::pipe()
                .atomic()
                .hset(&k.values, key, bytes)
                .ignore()
                .zadd(&k.order, key, 0)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    pub async fn delete(&self, scope: &str, key: &str) -> Result<bool, StateError> {
        let k = scope_keys(scope);
        let (removed,): (u32,) = self
            .write(|mut conn| async move {
                redis::pipe()
                    .atomic()
                    .hdel(&k.values, key)
                    .zrem(&k.order, key)
                    .ignore()
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(removed > 0)
    }

    pub async fn list(
        &self,
        scope: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Item>, StateError> {
        let k = scope_keys(scope);
        let (min, max) = if prefix.is_empty() {
            (b"-".to_vec(), b"+".to_vec())
        } else {
            // 0xFF never occurs in UTF-8, so every key with the prefix sorts below prefix+FF.
            let mut min = b"[".to_vec();
            min.extend_from_slice(prefix.as_bytes());
            let mut max = b"(".to_vec();
            max.extend_from_slice(prefix.as_bytes());
            max.push(0xFF);
            (min, max)
        };
        let mut conn = self.conn();
        let flat: Vec<Vec<u8>> = self
            .run(
                self.inner
                    .scripts
                    .list
                    .key(&k.order)
                    .key(&k.values)
                    .arg(min)
                    .arg(max)
                    .arg(limit)
                    .invoke_async(&mut conn),
            )
            .await?;
        flat.chunks_exact(2)
            .map(|kv| {
                Ok(Item {
                    key: String::from_utf8_lossy(&kv[0]).into_owned(),
                    value: decode_value(&kv[1])?,
                })
            })
            .collect()
    }

    pub async fn incr(
        &self,
        scope: &str,
        key: &str,
        by: i64,
        idempotency_key: Option<&str>,
    ) -> Result<i64, StateError> {
        let k = scope_keys(scope);
        let record = idempotency_key.map(|i| idempotency_record(scope, key, i));
        let script = &self.inner.scripts.incr;
        let (status, text): (String, String) = self
            .write(|mut conn| async move {
                let mut inv = script.key(&k.values);
                inv.key(&k.order);
                if let Some(r) = &record {
                    inv.key(r);
                }
                inv.arg(key)
                    .arg(by)
                    .arg(IDEMPOTENCY_TTL_SECS)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        match status.as_str() {
            "ok" => text
                .parse()
                .map_err(|_| StateError::Invalid(format!("stored value {text} is not an integer"))),
            "conflict" => Err(StateError::Conflict(format!(
                "idempotency key {:?} was used for a different request (by {text})",
                idempotency_key.unwrap_or("")
            ))),
            _ if text.contains("overflow") => Err(StateError::Invalid(format!(
                "adding {by} would overflow a 64-bit integer"
            ))),
            _ => Err(StateError::Invalid(format!(
                "the value at {key:?} is not an integer ({text})"
            ))),
        }
    }

    pub async fn admit(
        &self,
        subject: &str,
        limits: RateLimits,
        tokens: u64,
    ) -> Result<Admission, StateError> {
        // Limits past what a double counts exactly are as good as none.
        const EXACT: u64 = 1 << 52;
        let cap = |l: Option<u64>| l.map_or(0, |l| l.min(EXACT));
        let mut conn = self.conn();
        let key = format!("meshd:rate:{subject}");
        let (ok, requests, spent, reset_ms): (u8, u64, u64, u64) = self
            .run(
                self.inner
                    .scripts
                    .admit
                    .key(key)
                    .arg(cap(limits.requests))
                    .arg(cap(limits.tokens))
                    .arg(tokens.min(EXACT))
                    .arg(RATE_WINDOW_MS)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(Admission::from_counts(
            ok == 1,
            limits,
            requests,
            spent,
            reset_ms,
        ))
    }

    pub async fn save_trigger(&self, field: &str, v: Vec<u8>) -> Result<(), StateError> {
        let mut conn = self.conn();
        self.run(
            redis::cmd("HSET")
                .arg(TRIGGERS)
                .arg(field)
                .arg(v)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    pub async fn forget_trigger(&self, field: &str) -> Result<(), StateError> {
        let mut conn = self.conn();
        self.run(
            redis::cmd("HDEL")
                .arg(TRIGGERS)
                .arg(field)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    pub async fn triggers(&self) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let mut conn = self.conn();
        let all: Vec<(String, Vec<u8>)> = self
            .run(redis::cmd("HGETALL").arg(TRIGGERS).query_async(&mut conn))
            .await?;
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_keeps_one_hash_tag_and_keys_do_not_collide() {
        let a = scope_keys("math");
        assert!(a
            .values
            .starts_with(format!("meshd:{{{}}}:v:", a.tag).as_bytes()));
        assert!(a
            .order
            .starts_with(format!("meshd:{{{}}}:k:", a.tag).as_bytes()));
        let rec = idempotency_record("math", "t", "req");
        assert!(rec.starts_with(format!("meshd:{{{}}}:i:", a.tag).as_bytes()));
        assert_ne!(
            idempotency_record("a", "b\0c", "d"),
            idempotency_record("a", "b", "c\0d"),
        );
        assert_ne!(
            idempotency_record("a", "bc", "d"),
            idempotency_record("a", "b", "cd")
        );
        assert_ne!(scope_keys("a").tag, scope_keys("b").tag);
        assert!(!a.tag.contains('{') && !a.tag.contains('}'));
    }
}
