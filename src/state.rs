//! The state built-in: scoped keys over sled, with durable acknowledgements.
//!
//! Every write is answered only after sled has flushed it to disk. Flushes are shared (group
//! commit): writers that arrive while a flush runs wait for the next one, which covers all of them,
//! so durability costs one fsync per batch, not one per write.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

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
/// Idempotency records live under this prefix; no scope can start with NUL, so none collides.
const IDEM_PREFIX: &[u8] = b"\0idem\0";
/// Remembered HTTP triggers.
const TRIGGER_PREFIX: &[u8] = b"\0trigger\0";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("storage failure: {0}")]
    Storage(#[from] sled::Error),
    #[error("the state store is shut down")]
    Closed,
}

/// A request to be told when everything written so far is on disk. It carries its own handle to
/// the database so that the flusher holds none between batches: once every [`StateStore`] is
/// dropped, the database closes and can be opened again at once.
struct FlushWaiter {
    db: sled::Db,
    done: oneshot::Sender<Result<(), String>>,
}

/// The gateway's state store. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    db: sled::Db,
    flush_tx: mpsc::Sender<FlushWaiter>,
}

pub use crate::api::Item;

fn trigger_key(method: &str, path: &str) -> Vec<u8> {
    let mut k = TRIGGER_PREFIX.to_vec();
    k.extend_from_slice(format!("{} {path}", method.to_ascii_uppercase()).as_bytes());
    k
}

impl StateStore {
    /// Opens (or creates) the store under `dir` and starts its flusher on the current runtime.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StateError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        let db = sled::Config::new()
            .path(dir.join("state.sled"))
            .flush_every_ms(None)
            .open()?;
        let (flush_tx, flush_rx) = mpsc::channel(4096);
        tokio::spawn(group_commit(flush_rx));
        Ok(StateStore { db, flush_tx })
    }

    pub fn get(&self, scope: &str, key: &str) -> Result<Option<Value>, StateError> {
        let k = full_key(scope, key)?;
        self.db.get(k)?.map(|v| decode_value(&v)).transpose()
    }

    pub async fn set(&self, scope: &str, key: &str, value: &Value) -> Result<(), StateError> {
        let k = full_key(scope, key)?;
        let bytes = serde_json::to_vec(value).map_err(|e| StateError::Invalid(e.to_string()))?;
        if bytes.len() > MAX_VALUE_BYTES {
            return Err(StateError::Invalid(format!(
                "value of {} bytes exceeds the limit of {MAX_VALUE_BYTES}",
                bytes.len()
            )));
        }
        self.db.insert(k, bytes)?;
        self.durable().await
    }

    /// Deletes a key; answers whether it existed.
    pub async fn delete(&self, scope: &str, key: &str) -> Result<bool, StateError> {
        let k = full_key(scope, key)?;
        let existed = self.db.remove(k)?.is_some();
        self.durable().await?;
        Ok(existed)
    }

    /// Keys of `scope` starting with `prefix`, in key order, at most `limit` (≤ [`MAX_LIST`]).
    pub fn list(&self, scope: &str, prefix: &str, limit: usize) -> Result<Vec<Item>, StateError> {
        let start = full_key(scope, "")?;
        let scope_len = start.len();
        let mut p = start;
        p.extend_from_slice(prefix.as_bytes());
        self.db
            .scan_prefix(p)
            .take(limit.min(MAX_LIST))
            .map(|kv| {
                let (k, v) = kv?;
                Ok(Item {
                    key: String::from_utf8_lossy(&k[scope_len..]).into_owned(),
                    value: decode_value(&v)?,
                })
            })
            .collect()
    }

    /// Adds `by` to the integer at the key (absent counts as 0), atomically, and answers the new
    /// value once it is durable. Overflow and non-integer values are refused and change nothing.
    pub async fn incr(&self, scope: &str, key: &str, by: i64) -> Result<i64, StateError> {
        let k = full_key(scope, key)?;
        let mut refused: Option<StateError> = None;
        let mut result = 0i64;
        // sled's update is a compare-and-swap loop: concurrent increments never lose an update.
        self.db.update_and_fetch(k, |old| match added(old, by) {
            Ok(n) => {
                refused = None;
                result = n;
                Some(n.to_string().into_bytes())
            }
            Err(e) => {
                refused = Some(e);
                old.map(<[u8]>::to_vec)
            }
        })?;
        if let Some(e) = refused {
            return Err(e);
        }
        self.durable().await?;
        Ok(result)
    }

    /// Like [`incr`](Self::incr), but at most once per `idempotency_key`: a replay with the same
    /// key answers the value the first call produced and changes nothing (a replay with another
    /// `by` is a conflict). The increment and its record are written in one transaction.
    pub async fn incr_once(
        &self,
        scope: &str,
        key: &str,
        by: i64,
        idempotency_key: &str,
    ) -> Result<i64, StateError> {
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        if idempotency_key.is_empty() || idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(StateError::Invalid(format!(
                "an idempotency key must be 1..={MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        let counter = full_key(scope, key)?;
        let mut record_key = IDEM_PREFIX.to_vec();
        record_key.extend_from_slice(&counter);
        record_key.push(0);
        record_key.extend_from_slice(idempotency_key.as_bytes());
        let now = unix_now();
        let result = self.db.transaction(|tx| {
            if let Some(bytes) = tx.get(&record_key)? {
                let rec: IdemRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| Abort::Abort(StateError::Invalid(format!("idempotency record: {e}"))))?;
                if rec.by != by {
                    return Err(Abort::Abort(StateError::Conflict(format!(
                        "idempotency key {idempotency_key:?} was used for a different request (by {})",
                        rec.by
                    ))));
                }
                return Ok(rec.value);
            }
            let value = added(tx.get(&counter)?.as_deref(), by).map_err(Abort::Abort)?;
            tx.insert(counter.as_slice(), value.to_string().into_bytes())?;
            let rec = IdemRecord { by, value, at: now };
            tx.insert(record_key.as_slice(), serde_json::to_vec(&rec).expect("record serializes"))?;
            Ok(value)
        });
        let value = result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StateError::Storage(e),
        })?;
        self.durable().await?;
        Ok(value)
    }

    /// Remembers an HTTP trigger, so a restarted gateway knows its routes before the workers
    /// are back (and answers 503 for them, not 404). Written lazily: losing one is harmless.
    pub fn save_trigger(
        &self,
        method: &str,
        path: &str,
        function: &str,
        requires: &[String],
    ) -> Result<(), StateError> {
        let v = serde_json::json!({"function": function, "requires": requires});
        self.db.insert(
            trigger_key(method, path),
            serde_json::to_vec(&v).expect("json"),
        )?;
        Ok(())
    }

    /// Forgets a trigger that expired (its function had no worker for the grace period).
    pub fn forget_trigger(&self, method: &str, path: &str) -> Result<(), StateError> {
        self.db.remove(trigger_key(method, path))?;
        Ok(())
    }

    /// Every remembered trigger: (method, path, function, requires).
    pub fn triggers(&self) -> Vec<(String, String, String, Vec<String>)> {
        self.db
            .scan_prefix(TRIGGER_PREFIX)
            .flatten()
            .filter_map(|(k, v)| {
                let key = std::str::from_utf8(&k[TRIGGER_PREFIX.len()..]).ok()?;
                let (method, path) = key.split_once(' ')?;
                let v: Value = serde_json::from_slice(&v).ok()?;
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
            })
            .collect()
    }

    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), StateError> {
        let (done, rx) = oneshot::channel();
        let waiter = FlushWaiter {
            db: self.db.clone(),
            done,
        };
        self.flush_tx
            .send(waiter)
            .await
            .map_err(|_| StateError::Closed)?;
        rx.await
            .map_err(|_| StateError::Closed)?
            .map_err(|e| StateError::Storage(sled::Error::Unsupported(e)))
    }

    /// Flushes synchronously (shutdown).
    pub fn flush_now(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Serves flush requests: takes every waiter that is queued, flushes once, answers them all.
async fn group_commit(mut rx: mpsc::Receiver<FlushWaiter>) {
    let mut last_sweep = 0;
    while let Some(first) = rx.recv().await {
        let now = unix_now();
        let sweep = now > last_sweep + 600;
        if sweep {
            last_sweep = now;
        }
        let db = first.db.clone();
        let mut waiters = vec![first.done];
        while let Ok(more) = rx.try_recv() {
            waiters.push(more.done);
        }
        let result = tokio::task::spawn_blocking(move || {
            if sweep {
                sweep_idempotency(&db, now);
            }
            db.flush()
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// The integer stored in `old` (absent counts as 0) plus `by`; refuses a non-integer value and
/// overflow. The one rule both increments follow.
fn added(old: Option<&[u8]>, by: i64) -> Result<i64, StateError> {
    let current = match old.map(serde_json::from_slice::<Value>) {
        None => 0,
        Some(Ok(v)) => v
            .as_i64()
            .ok_or_else(|| StateError::Invalid(format!("value {v} is not an integer")))?,
        Some(Err(_)) => return Err(StateError::Invalid("stored value is not JSON".into())),
    };
    current.checked_add(by).ok_or_else(|| {
        StateError::Invalid(format!(
            "adding {by} to {current} would overflow a 64-bit integer"
        ))
    })
}

#[derive(Serialize, Deserialize)]
struct IdemRecord {
    by: i64,
    value: i64,
    at: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Drops idempotency records older than [`IDEMPOTENCY_TTL_SECS`], so they cannot grow forever.
fn sweep_idempotency(db: &sled::Db, now: u64) {
    let mut removed = 0;
    for (k, v) in db.scan_prefix(IDEM_PREFIX).flatten() {
        let old = serde_json::from_slice::<IdemRecord>(&v)
            .map(|r| r.at + IDEMPOTENCY_TTL_SECS < now)
            .unwrap_or(true);
        if old && db.remove(k).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "expired idempotency records");
    }
}

fn full_key(scope: &str, key: &str) -> Result<Vec<u8>, StateError> {
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
    let mut k = Vec::with_capacity(scope.len() + 1 + key.len());
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    Ok(k)
}

fn decode_value(bytes: &[u8]) -> Result<Value, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Invalid(format!("stored value: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn set_get_list_delete_are_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        s.set("a", "k1", &json!({"x": 1})).await.unwrap();
        s.set("a", "k2", &json!("two")).await.unwrap();
        s.set("b", "k1", &json!(3)).await.unwrap();
        assert_eq!(s.get("a", "k1").unwrap(), Some(json!({"x": 1})));
        assert_eq!(s.get("b", "k1").unwrap(), Some(json!(3)));
        let keys: Vec<_> = s
            .list("a", "k", 10)
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        assert!(s.delete("a", "k1").await.unwrap());
        assert!(!s.delete("a", "k1").await.unwrap());
        assert_eq!(s.get("a", "k1").unwrap(), None);
        assert!(s.get("", "k").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_increments_lose_nothing_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path()).unwrap();
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
        }
        // (1 + … + 32) × 50
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.get("math", "total").unwrap(), Some(json!(26_400)));
    }

    #[tokio::test]
    async fn an_idempotent_increment_applies_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
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
        assert_eq!(s.get("m", "t").unwrap(), Some(json!(8)));
        let keys: Vec<_> = s
            .list("m", "", 10)
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, ["t"], "records stay out of the scope's keys");
        sweep_idempotency(&s.db, unix_now() + IDEMPOTENCY_TTL_SECS + 1);
        assert_eq!(
            s.incr_once("m", "t", 5, "req-1").await.unwrap(),
            13,
            "expired records are gone"
        );
    }

    #[tokio::test]
    async fn triggers_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        s.save_trigger("post", "/a b", "f", &["g".into()]).unwrap();
        s.save_trigger("GET", "/c", "h", &[]).unwrap();
        assert_eq!(
            s.triggers(),
            vec![
                ("GET".into(), "/c".into(), "h".into(), vec![]),
                ("POST".into(), "/a b".into(), "f".into(), vec!["g".into()])
            ]
        );
        assert!(s.list("POST", "", 10).unwrap().is_empty());
        s.forget_trigger("GET", "/c").unwrap();
        assert_eq!(s.triggers().len(), 1);
    }

    #[tokio::test]
    async fn overflow_and_non_integers_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        s.incr("m", "t", i64::MAX - 1).await.unwrap();
        assert!(matches!(
            s.incr("m", "t", 5).await,
            Err(StateError::Invalid(_))
        ));
        assert_eq!(s.get("m", "t").unwrap(), Some(json!(i64::MAX - 1)));
        s.set("m", "s", &json!("text")).await.unwrap();
        assert!(s.incr("m", "s", 1).await.is_err());
        assert_eq!(s.get("m", "s").unwrap(), Some(json!("text")));
    }
}
