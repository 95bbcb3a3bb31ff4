//! `GET /readyz?deep=1`: proves the whole chain works, for load balancer health checks that must
//! not trust a registration alone. Two real requests run through the same triggers and workers
//! as any client's: a math call (caller → infer → the state built-in) and a one-token greedy
//! generation (caller → infer → the engine), each with a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::registry::Reply;
use super::Shared;
use crate::protocol::{HttpRequestHead, Outcome};

/// Longest one check may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The checks: a name, the trigger they go through, and the body they send. Adding 0 leaves the
/// running total as it was (the increment is still written and flushed, which is the point).
const CHECKS: [(&str, &str, &str); 2] = [
    ("math", "/math/add-two-numbers", r#"{"a":0,"b":0}"#),
    (
        "generate",
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"ping"}],"max_tokens":1,"temperature":0}"#,
    ),
];

/// Runs every check at once; answers whether all passed, and what each one found.
pub async fn deep(shared: &Arc<Shared>, trace_id: &str) -> (bool, Value) {
    let runs = CHECKS.iter().map(|(name, path, body)| async move {
        (*name, check(shared, path, body, trace_id).await)
    });
    let results = futures_util::future::join_all(runs).await;
    let ok = results.iter().all(|(_, r)| r.is_ok());
    let checks: serde_json::Map<String, Value> = results
        .into_iter()
        .map(|(name, r)| {
            let v = match r {
                Ok(ms) => json!({"ok": true, "ms": ms}),
                Err(e) => json!({"ok": false, "error": e}),
            };
            (name.to_string(), v)
        })
        .collect();
    (ok, json!({"ready": ok, "deep": true, "checks": checks}))
}

/// One request through `POST path`; the milliseconds it took, or why it failed.
async fn check(
    shared: &Arc<Shared>,
    path: &str,
    body: &str,
    trace_id: &str,
) -> Result<u64, String> {
    let start = Instant::now();
    let function = shared
        .registry()
        .trigger("POST", path)
        .map_err(|_| format!("no trigger for POST {path}"))?;
    let head = HttpRequestHead {
        method: "POST".into(),
        path: path.into(),
        query: String::new(),
        headers: vec![("content-type".into(), "application/json".into())],
    };
    let mut call = shared
        .invoke_local(
            &function,
            None,
            Bytes::from(body.to_string()),
            Some(head),
            trace_id,
        )
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(DEADLINE, call.replies.recv())
        .await
        .map_err(|_| format!("POST {path} did not answer within {} s", DEADLINE.as_secs()))?;
    let status = match reply {
        Some(Reply::Done(Outcome::Ok { http, .. })) => http.map_or(200, |h| h.status),
        Some(Reply::Done(Outcome::Error(e))) => return Err(format!("POST {path}: {e}")),
        Some(other) => return Err(format!("POST {path}: unexpected answer {other:?}")),
        None => return Err(format!("POST {path}: the invocation was dropped")),
    };
    if status != 200 {
        return Err(format!("POST {path} answered {status}"));
    }
    Ok(start.elapsed().as_millis() as u64)
}
