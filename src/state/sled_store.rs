//! The embedded backend: scoped keys over sled, with durable acknowledgements.
//!
//! Every write is answered only after sled has flushed it to disk. Flushes are shared (group
//! commit): writers that arrive while a flush runs wait for the next one, which covers all of them,
//! so durability costs one fsync per batch, not one per write.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{
    decode_value, unix_now, unix_now_ms, Admission, Item, RateLimits, StateError,
    IDEMPOTENCY_TTL_SECS, RATE_WINDOW_MS,
};

/// Idempotency records live under this prefix; no scope can start with NUL, so none collides.
const IDEM_PREFIX: &[u8] = b"\0idem\0";
/// Remembered HTTP triggers.
const TRIGGER_PREFIX: &[u8] = b"\0trigger\0";
/// Rate-limit windows, by subject.
const RATE_PREFIX: &[u8] = b"\0rate\0";

/// A request to be told when everything written so far is on disk. It carries its own handle to
/// the database so that the flusher holds none between batches: once every [`SledStore`] is
/// dropped, the database closes and can be opened again at once.
struct FlushWaiter {
    db: sled::Db,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    flush_tx: mpsc::Sender<FlushWaiter>,
    path: PathBuf,
}

fn prefixed(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<SledStore, StateError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StateError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("state.sled");
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()?;
        let (flush_tx, flush_rx) = mpsc::channel(4096);
        tokio::spawn(group_commit(flush_rx));
        Ok(SledStore { db, flush_tx, path })
    }

    pub fn describe(&self) -> String {
        format!(
            "sled at {} (fsync before every acknowledgement)",
            self.path.display()
        )
    }

    pub fn get(&self, scope: &str, key: &str) -> Result<Option<Value>, StateError> {
        self.db
            .get(full_key(scope, key))?
            .map(|v| decode_value(&v))
            .transpose()
    }

    pub async fn set(&self, scope: &str, key: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        self.db.insert(full_key(scope, key), bytes)?;
        self.durable().await
    }

    pub async fn delete(&self, scope: &str, key: &str) -> Result<bool, StateError> {
        let existed = self.db.remove(full_key(scope, key))?.is_some();
        self.durable().await?;
        Ok(existed)
    }

    pub fn list(&self, scope: &str, prefix: &str, limit: usize) -> Result<Vec<Item>, StateError> {
        let scope_len = scope.len() + 1;
        self.db
            .scan_prefix(full_key(scope, prefix))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok(Item {
                    key: String::from_utf8_lossy(&k[scope_len..]).into_owned(),
                    value: decode_value(&v)?,
                })
            })
            .collect()
    }

    pub async fn incr(&self, scope: &str, key: &str, by: i64) -> Result<i64, StateError> {
        let mut refused: Option<StateError> = None;
        let mut result = 0i64;
        // sled's update is a compare-and-swap loop: concurrent increments never lose an update.
        self.db
            .update_and_fetch(full_key(scope, key), |old| match added(old, by) {
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

    /// The increment and its record are written in one transaction.
    pub async fn incr_once(
        &self,
        scope: &str,
        key: &str,
        by: i64,
        idempotency_key: &str,
    ) -> Result<i64, StateError> {
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let counter = full_key(scope, key);
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

    /// One gateway's counts, in memory-mapped sled (not flushed: a crash forgets at most the
    /// current minute's counts, which errs toward serving).
    pub fn admit(
        &self,
        subject: &str,
        limits: RateLimits,
        tokens: u64,
    ) -> Result<Admission, StateError> {
        let now = unix_now_ms();
        let window = now / RATE_WINDOW_MS;
        let reset_ms = (window + 1) * RATE_WINDOW_MS - now;
        let mut decision = None;
        self.db
            .update_and_fetch(prefixed(RATE_PREFIX, subject), |old| {
                let rec = old
                    .and_then(|b| serde_json::from_slice::<RateRecord>(b).ok())
                    .filter(|r| r.window == window)
                    .unwrap_or(RateRecord {
                        window,
                        requests: 0,
                        tokens: 0,
                    });
                let requests = rec.requests + 1;
                let spent = rec.tokens.saturating_add(tokens);
                let allowed = limits.requests.is_none_or(|l| requests <= l)
                    && limits.tokens.is_none_or(|l| spent <= l);
                let next = if allowed {
                    RateRecord {
                        window,
                        requests,
                        tokens: spent,
                    }
                } else {
                    rec
                };
                decision = Some(Admission::from_counts(
                    allowed,
                    limits,
                    next.requests,
                    next.tokens,
                    reset_ms,
                ));
                Some(serde_json::to_vec(&next).expect("record serializes"))
            })?;
        Ok(decision.expect("the update ran"))
    }

    pub fn save_trigger(&self, field: &str, v: Vec<u8>) -> Result<(), StateError> {
        self.db.insert(prefixed(TRIGGER_PREFIX, field), v)?;
        Ok(())
    }

    pub fn forget_trigger(&self, field: &str) -> Result<(), StateError> {
        self.db.remove(prefixed(TRIGGER_PREFIX, field))?;
        Ok(())
    }

    /// Every remembered trigger: (`METHOD path`, its JSON).
    pub fn triggers(&self) -> Vec<(String, Vec<u8>)> {
        self.db
            .scan_prefix(TRIGGER_PREFIX)
            .flatten()
            .filter_map(|(k, v)| {
                let field = std::str::from_utf8(&k[TRIGGER_PREFIX.len()..]).ok()?;
                Some((field.to_string(), v.to_vec()))
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
struct RateRecord {
    window: u64,
    requests: u64,
    tokens: u64,
}

#[derive(Serialize, Deserialize)]
struct IdemRecord {
    by: i64,
    value: i64,
    at: u64,
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

fn full_key(scope: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + 1 + key.len());
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expired_idempotency_records_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.incr_once("m", "t", 5, "req-1").await.unwrap(), 5);
        assert_eq!(s.incr_once("m", "t", 5, "req-1").await.unwrap(), 5);
        sweep_idempotency(&s.db, unix_now() + IDEMPOTENCY_TTL_SECS + 1);
        assert_eq!(
            s.incr_once("m", "t", 5, "req-1").await.unwrap(),
            10,
            "expired records are gone"
        );
    }

    #[tokio::test]
    async fn a_reopened_store_keeps_what_was_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.incr("m", "t", 7).await.unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get("m", "t").unwrap(), Some(serde_json::json!(7)));
    }
}
