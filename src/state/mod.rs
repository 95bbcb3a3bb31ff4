//! The state built-in: scoped keys with durable acknowledgements, on one of two backends.
//!
//! - **sled** (the default, and `meshd up`'s): embedded, on the gateway's own disk. A write is
//!   answered once sled has flushed it (group commit: one fsync per batch of writers).
//! - **Redis** (`state_url = "redis://…"` or `rediss://…`: Redis, Valkey, ElastiCache, MemoryDB):
//!   shared by every gateway, so any gateway can die or be replaced without losing state. A write
//!   is answered once Redis has it under the configured durability policy (see
//!   [`redis_store`]).
//!
//! Both give every operation the same meaning, checked by the same tests: `incr` is atomic and
//! exact under any concurrency, an idempotent increment and its record are one atomic step, and a
//! per-key rate limit is one increment-and-check in the backend — never a local counter compared
//! against a shared one.

use serde_json::Value;

mod redis_store;
mod sled_store;

pub use crate::api::Item;
pub use redis_store::RedisOptions;

/// Longest scope or key accepted.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value accepted (JSON-encoded).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most items one `list` returns.
pub const MAX_LIST: usize = 1000;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// How long an idempotent increment's answer is kept for replays.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;
/// The rate-limit window: limits are per minute, in fixed windows aligned on the minute.
pub const RATE_WINDOW_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("storage failure: {0}")]
    Storage(#[from] sled::Error),
    /// The backend cannot be reached or did not answer in time (Redis down, a partition): the
    /// caller gets a 503 `state_unavailable` and may retry; nothing was acknowledged.
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    #[error("the state store is shut down")]
    Closed,
}

/// Per-minute limits of one API key; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

impl RateLimits {
    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// One limit's standing after a request was counted (or refused) in the current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window resets.
    pub reset_ms: u64,
}

/// What [`StateStore::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub allowed: bool,
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

impl Admission {
    /// The decision from the counts in the window (`used_*` after this request if it was
    /// allowed, before it if not): the one rule both backends report through.
    fn from_counts(
        allowed: bool,
        limits: RateLimits,
        used_requests: u64,
        used_tokens: u64,
        reset_ms: u64,
    ) -> Admission {
        let window = |limit: Option<u64>, used: u64| {
            limit.map(|limit| Window {
                limit,
                remaining: limit.saturating_sub(used),
                reset_ms,
            })
        };
        Admission {
            allowed,
            requests: window(limits.requests, used_requests),
            tokens: window(limits.tokens, used_tokens),
        }
    }
}

/// The gateway's state store: sled or Redis behind one API. Cheap to clone.
#[derive(Clone)]
pub enum StateStore {
    Sled(sled_store::SledStore),
    Redis(redis_store::RedisStore),
}

impl StateStore {
    /// Opens (or creates) the embedded store under `dir`; starts its flusher on the current
    /// runtime.
    pub fn open(dir: &std::path::Path) -> Result<StateStore, StateError> {
        sled_store::SledStore::open(dir).map(StateStore::Sled)
    }

    /// Connects to Redis. The gateway starts even when Redis is down (it answers 503
    /// `state_unavailable` until Redis is back); a URL or TLS file that cannot work is an error.
    pub async fn connect_redis(opts: RedisOptions) -> Result<StateStore, StateError> {
        redis_store::RedisStore::connect(opts)
            .await
            .map(StateStore::Redis)
    }

    /// The store the settings name: Redis when `state_url` is set, else sled in `data_dir`.
    pub async fn from_settings(s: &crate::config::Settings) -> Result<StateStore, StateError> {
        match s.redis_options() {
            Some(opts) => StateStore::connect_redis(opts).await,
            None => StateStore::open(&s.data_dir),
        }
    }

    /// Where the state lives, for the startup log.
    pub fn describe(&self) -> String {
        match self {
            StateStore::Sled(s) => s.describe(),
            StateStore::Redis(r) => r.describe(),
        }
    }

    pub async fn get(&self, scope: &str, key: &str) -> Result<Option<Value>, StateError> {
        check_key(scope, key)?;
        match self {
            StateStore::Sled(s) => s.get(scope, key),
            StateStore::Redis(r) => r.get(scope, key).await,
        }
    }

    pub async fn set(&self, scope: &str, key: &str, value: &Value) -> Result<(), StateError> {
        check_key(scope, key)?;
        let bytes = serde_json::to_vec(value).map_err(|e| StateError::Invalid(e.to_string()))?;
        if bytes.len() > MAX_VALUE_BYTES {
            return Err(StateError::Invalid(format!(
                "value of {} bytes exceeds the limit of {MAX_VALUE_BYTES}",
                bytes.len()
            )));
        }
        match self {
            StateStore::Sled(s) => s.set(scope, key, bytes).await,
            StateStore::Redis(r) => r.set(scope, key, bytes).await,
        }
    }

    /// Deletes a key; answers whether it existed.
    pub async fn delete(&self, scope: &str, key: &str) -> Result<bool, StateError> {
        check_key(scope, key)?;
        match self {
            StateStore::Sled(s) => s.delete(scope, key).await,
            StateStore::Redis(r) => r.delete(scope, key).await,
        }
    }

    /// Keys of `scope` starting with `prefix`, in key (byte) order, at most `limit`
    /// (≤ [`MAX_LIST`]).
    pub async fn list(
        &self,
        scope: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Item>, StateError> {
        check_key(scope, prefix)?;
        let limit = limit.min(MAX_LIST);
        match self {
            StateStore::Sled(s) => s.list(scope, prefix, limit),
            StateStore::Redis(r) => r.list(scope, prefix, limit).await,
        }
    }

    /// Adds `by` to the integer at the key (absent counts as 0), atomically, and answers the new
    /// value once it is durable. Overflow and non-integer values are refused and change nothing.
    pub async fn incr(&self, scope: &str, key: &str, by: i64) -> Result<i64, StateError> {
        check_key(scope, key)?;
        match self {
            StateStore::Sled(s) => s.incr(scope, key, by).await,
            StateStore::Redis(r) => r.incr(scope, key, by, None).await,
        }
    }

    /// Like [`incr`](Self::incr), but at most once per `idempotency_key`: a replay with the same
    /// key answers the value the first call produced and changes nothing (a replay with another
    /// `by` is a conflict). The increment and its record are one atomic step; records expire
    /// after [`IDEMPOTENCY_TTL_SECS`].
    pub async fn incr_once(
        &self,
        scope: &str,
        key: &str,
        by: i64,
        idempotency_key: &str,
    ) -> Result<i64, StateError> {
        check_key(scope, key)?;
        // Without NUL, the last NUL of a record's name ends the counter's part.
        if idempotency_key.is_empty()
            || idempotency_key.len() > MAX_IDEMPOTENCY_KEY
            || idempotency_key.contains('\0')
        {
            return Err(StateError::Invalid(format!(
                "an idempotency key must be 1..={MAX_IDEMPOTENCY_KEY} bytes without NUL"
            )));
        }
        match self {
            StateStore::Sled(s) => s.incr_once(scope, key, by, idempotency_key).await,
            StateStore::Redis(r) => r.incr(scope, key, by, Some(idempotency_key)).await,
        }
    }

    /// Counts one request costing `tokens` against `subject`'s per-minute limits, in one atomic
    /// increment-and-check: allowed only if neither limit would be passed, and then counted; a
    /// refused request counts nothing. With Redis every gateway shares the counts (and Redis's
    /// clock draws the windows), so a limit holds exactly across gateways.
    pub async fn admit(
        &self,
        subject: &str,
        limits: RateLimits,
        tokens: u64,
    ) -> Result<Admission, StateError> {
        match self {
            StateStore::Sled(s) => s.admit(subject, limits, tokens),
            StateStore::Redis(r) => r.admit(subject, limits, tokens).await,
        }
    }

    /// Remembers an HTTP trigger, so a restarted gateway knows its routes before the workers
    /// are back (and answers 503 for them, not 404). Losing one is harmless.
    pub async fn save_trigger(
        &self,
        method: &str,
        path: &str,
        function: &str,
        requires: &[String],
    ) -> Result<(), StateError> {
        let v = serde_json::json!({"function": function, "requires": requires});
        let v = serde_json::to_vec(&v).expect("json");
        let field = trigger_field(method, path);
        match self {
            StateStore::Sled(s) => s.save_trigger(&field, v),
            StateStore::Redis(r) => r.save_trigger(&field, v).await,
        }
    }

    /// Forgets a trigger that expired (its function had no worker for the grace period).
    pub async fn forget_trigger(&self, method: &str, path: &str) -> Result<(), StateError> {
        let field = trigger_field(method, path);
        match self {
            StateStore::Sled(s) => s.forget_trigger(&field),
            StateStore::Redis(r) => r.forget_trigger(&field).await,
        }
    }

    /// Every remembered trigger: (method, path, function, requires), in (method, path) order.
    pub async fn triggers(&self) -> Result<Vec<(String, String, String, Vec<String>)>, StateError> {
        let raw = match self {
            StateStore::Sled(s) => s.triggers(),
            StateStore::Redis(r) => r.triggers().await?,
        };
        let mut out: Vec<_> = raw
            .into_iter()
            .filter_map(|(field, v)| parse_trigger(&field, &v))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Makes everything written so far durable now (shutdown). Redis acknowledged every write
    /// under its policy already.
    pub fn flush_now(&self) -> Result<(), StateError> {
        match self {
            StateStore::Sled(s) => s.flush_now(),
            StateStore::Redis(_) => Ok(()),
        }
    }
}

/// `METHOD path`, the one name of a trigger in both backends.
fn trigger_field(method: &str, path: &str) -> String {
    format!("{} {path}", method.to_ascii_uppercase())
}

fn parse_trigger(field: &str, v: &[u8]) -> Option<(String, String, String, Vec<String>)> {
    let (method, path) = field.split_once(' ')?;
    let v: Value = serde_json::from_slice(v).ok()?;
    let requires = v["requires"]
        .as_array()?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    Some((
        method.to_string(),
        path.to_string(),
        v["function"].as_str()?.to_string(),
        requires,
    ))
}

/// The limits every scope and key obey, whatever the backend.
fn check_key(scope: &str, key: &str) -> Result<(), StateError> {
    if scope.is_empty() || scope.len() > MAX_KEY_BYTES || scope.contains('\0') {
        return Err(StateError::Invalid(format!(
            "scope must be 1..={MAX_KEY_BYTES} bytes without NUL"
        )));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StateError::Invalid(format!(
            "key must be at most {MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

fn decode_value(bytes: &[u8]) -> Result<Value, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Invalid(format!("stored value: {e}")))
}

fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The contract both backends keep, run against each (sled here, a real redis-server in
/// `tests/state_redis.rs`).
#[doc(hidden)]
pub mod contract {
    use super::*;
    use serde_json::json;

    async fn keys(s: &StateStore, scope: &str, prefix: &str) -> Vec<String> {
        s.list(scope, prefix, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect()
    }

    /// Get, set, delete and list, each within its scope; list in byte order by prefix.
    pub async fn scoped_keys(s: &StateStore) {
        s.set("a", "k1", &json!({"x": 1})).await.unwrap();
        s.set("a", "k2", &json!("two")).await.unwrap();
        s.set("a", "j", &json!(null)).await.unwrap();
        s.set("b", "k1", &json!(3)).await.unwrap();
        assert_eq!(s.get("a", "k1").await.unwrap(), Some(json!({"x": 1})));
        assert_eq!(s.get("b", "k1").await.unwrap(), Some(json!(3)));
        assert_eq!(s.get("a", "j").await.unwrap(), Some(json!(null)));
        assert_eq!(keys(s, "a", "k").await, ["k1", "k2"]);
        assert_eq!(keys(s, "a", "").await, ["j", "k1", "k2"]);
        assert_eq!(
            s.list("a", "", 2).await.unwrap().len(),
            2,
            "the limit holds"
        );
        s.set("a", "k1", &json!(9)).await.unwrap();
        assert_eq!(
            s.get("a", "k1").await.unwrap(),
            Some(json!(9)),
            "set replaces"
        );
        assert!(s.delete("a", "k1").await.unwrap());
        assert!(!s.delete("a", "k1").await.unwrap());
        assert_eq!(s.get("a", "k1").await.unwrap(), None);
        assert_eq!(keys(s, "a", "k").await, ["k2"]);
        assert!(s.get("", "k").await.is_err());
        assert!(s.get(&"s".repeat(MAX_KEY_BYTES + 1), "k").await.is_err());
        let big = json!("x".repeat(MAX_VALUE_BYTES));
        assert!(matches!(
            s.set("a", "big", &big).await,
            Err(StateError::Invalid(_))
        ));
    }

    /// 32 tasks × 50 increments lose nothing.
    pub async fn concurrent_increments(s: &StateStore) {
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        s.incr("math", "total", t + 1).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // (1 + … + 32) × 50
        assert_eq!(s.get("math", "total").await.unwrap(), Some(json!(26_400)));
    }

    /// An idempotent increment applies once; a replay with another `by` is a conflict; the
    /// records stay out of the scope's keys.
    pub async fn idempotent_increments(s: &StateStore) {
        assert_eq!(s.incr_once("m", "t", 5, "req-1").await.unwrap(), 5);
        assert_eq!(s.incr("m", "t", 1).await.unwrap(), 6);
        assert_eq!(
            s.incr_once("m", "t", 5, "req-1").await.unwrap(),
            5,
            "a replay answers the first value"
        );
        assert_eq!(s.incr_once("m", "t", 2, "req-2").await.unwrap(), 8);
        assert!(matches!(
            s.incr_once("m", "t", 7, "req-1").await,
            Err(StateError::Conflict(_))
        ));
        assert_eq!(
            s.incr_once("m", "u", 1, "req-1").await.unwrap(),
            1,
            "a record belongs to its counter"
        );
        assert_eq!(s.get("m", "t").await.unwrap(), Some(json!(8)));
        assert_eq!(keys(s, "m", "").await, ["t", "u"]);
        assert!(s.incr_once("m", "t", 1, "").await.is_err());
        assert!(s.incr_once("m", "t", 1, "a\0b").await.is_err());
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
        assert!(s.incr_once("m", "t", 1, &long).await.is_err());
    }

    /// Overflow and non-integers are refused and change nothing; huge values stay exact.
    pub async fn refusals_change_nothing(s: &StateStore) {
        assert_eq!(
            s.incr("m", "big", i64::MAX - 1).await.unwrap(),
            i64::MAX - 1
        );
        assert!(matches!(
            s.incr("m", "big", 5).await,
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(
            s.incr_once("m", "big", 5, "over").await,
            Err(StateError::Invalid(_))
        ));
        assert_eq!(s.get("m", "big").await.unwrap(), Some(json!(i64::MAX - 1)));
        assert_eq!(
            s.incr_once("m", "big", -(i64::MAX - 1), "over")
                .await
                .unwrap(),
            0,
            "a refused step leaves no record"
        );
        s.set("m", "s", &json!("text")).await.unwrap();
        assert!(s.incr("m", "s", 1).await.is_err());
        s.set("m", "f", &json!(1.5)).await.unwrap();
        assert!(s.incr("m", "f", 1).await.is_err());
        assert_eq!(s.get("m", "s").await.unwrap(), Some(json!("text")));
        assert_eq!(s.get("m", "f").await.unwrap(), Some(json!(1.5)));
    }

    /// Triggers are remembered apart from every scope.
    pub async fn triggers(s: &StateStore) {
        s.save_trigger("post", "/a b", "f", &["g".into()])
            .await
            .unwrap();
        s.save_trigger("GET", "/c", "h", &[]).await.unwrap();
        assert_eq!(
            s.triggers().await.unwrap(),
            vec![
                ("GET".into(), "/c".into(), "h".into(), vec![]),
                ("POST".into(), "/a b".into(), "f".into(), vec!["g".into()])
            ]
        );
        assert!(s.list("POST", "", 10).await.unwrap().is_empty());
        s.forget_trigger("GET", "/c").await.unwrap();
        assert_eq!(s.triggers().await.unwrap().len(), 1);
    }

    /// Exactly `limit` requests pass in a window, counted atomically under concurrency; a
    /// refused request counts nothing; tokens are limited the same way.
    pub async fn rate_limits(s: &StateStore) {
        // The windows are aligned on the minute: start the burst well inside one.
        let probe = RateLimits {
            requests: Some(1 << 40),
            tokens: None,
        };
        let left = s.admit("probe", probe, 0).await.unwrap().requests.unwrap();
        if left.reset_ms < 5_000 {
            tokio::time::sleep(std::time::Duration::from_millis(left.reset_ms + 100)).await;
        }
        let limits = RateLimits {
            requests: Some(10),
            tokens: None,
        };
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.admit("key-a", limits, 0).await.unwrap() })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            let a = t.await.unwrap();
            allowed += usize::from(a.allowed);
            let w = a.requests.unwrap();
            assert_eq!(w.limit, 10);
            assert!(w.reset_ms <= RATE_WINDOW_MS);
            assert!(a.tokens.is_none());
        }
        assert_eq!(allowed, 10, "exactly the limit passes in one window");
        let after = s.admit("key-a", limits, 0).await.unwrap();
        assert!(!after.allowed);
        assert_eq!(after.requests.unwrap().remaining, 0);
        let tokens = RateLimits {
            requests: None,
            tokens: Some(100),
        };
        let a = s.admit("key-b", tokens, 60).await.unwrap();
        assert!(a.allowed);
        assert_eq!(a.tokens.unwrap().remaining, 40);
        let b = s.admit("key-b", tokens, 50).await.unwrap();
        assert!(!b.allowed, "60 + 50 > 100");
        assert_eq!(b.tokens.unwrap().remaining, 40, "a refusal counts nothing");
        assert!(s.admit("key-b", tokens, 40).await.unwrap().allowed);
        let other = s.admit("key-c", tokens, 100).await.unwrap();
        assert!(other.allowed, "each key has its own window");
        assert!(
            s.admit("key-d", RateLimits::default(), 1 << 40)
                .await
                .unwrap()
                .allowed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sled() -> (tempfile::TempDir, StateStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn sled_keeps_the_contract() {
        let (_dir, s) = sled();
        contract::scoped_keys(&s).await;
        contract::idempotent_increments(&s).await;
        contract::refusals_change_nothing(&s).await;
        contract::triggers(&s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_counts_exactly_under_concurrency() {
        let (_dir, s) = sled();
        contract::concurrent_increments(&s).await;
        contract::rate_limits(&s).await;
    }
}
