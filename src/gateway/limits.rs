//! Per-API-key rate limits: requests and tokens per minute, counted in the state backend (sled
//! for one gateway, Redis shared by all), and OpenAI's `x-ratelimit-*` headers on every answer.
//!
//! Tokens are counted as OpenAI counts them when a request is admitted: the prompt estimated from
//! the request's size (4 bytes a token) plus the `max_tokens` asked for. The count is one atomic
//! increment-and-check in the backend, so the limit holds exactly however many gateways share it.

use hyper::header::HeaderValue;
use hyper::Response;

use super::http::Body;
use crate::config::ApiKey;
use crate::protocol::{ErrorBody, ErrorCode};
use crate::state::{Admission, StateStore};

/// What a request is expected to cost in tokens: 0 for a body that is not a completion request.
pub fn token_cost(body: &[u8]) -> u64 {
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return 0;
    };
    if !["messages", "prompt", "input"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return 0;
    }
    let asked = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(serde_json::Value::as_u64))
        .unwrap_or(0);
    (body.len() as u64).div_ceil(4).saturating_add(asked)
}

/// Counts the request against its key's limits. `Ok(Some(admission))` when the key has limits
/// (allowed or not), `Ok(None)` when it has none. When the backend cannot answer, the request
/// is served uncounted (a limit protects capacity; it must not take the API down with Redis).
pub async fn admit(state: &StateStore, key: &ApiKey, body: &[u8]) -> Option<Admission> {
    if key.limits.is_unlimited() {
        return None;
    }
    let cost = if key.limits.tokens.is_some() {
        token_cost(body)
    } else {
        0
    };
    match state.admit(&key.subject(), key.limits, cost).await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(error = %e, "rate limits not counted");
            None
        }
    }
}

/// The 429 for a request past its limits, OpenAI's way: which limit, and when to come back.
pub fn refusal(a: &Admission) -> ErrorBody {
    let (what, window) = match (a.requests.filter(|w| w.remaining == 0), a.tokens) {
        (Some(w), _) => ("requests", w),
        (None, Some(w)) => ("tokens", w),
        (None, None) => ("requests", a.requests.expect("a refusal has a limit")),
    };
    ErrorBody::new(
        ErrorCode::RateLimited,
        format!(
            "Rate limit reached for {what} per minute: limit {}, remaining {}. Please try again in {}.",
            window.limit,
            window.remaining,
            duration(window.reset_ms)
        ),
    )
}

/// Adds the `x-ratelimit-*` headers (and `Retry-After` on a refusal).
pub fn headers(resp: &mut Response<Body>, a: &Admission) {
    let h = resp.headers_mut();
    for (kind, window) in [("requests", a.requests), ("tokens", a.tokens)] {
        let Some(w) = window else { continue };
        let mut put = |name: String, value: String| {
            if let (Ok(n), Ok(v)) = (
                hyper::header::HeaderName::try_from(name),
                HeaderValue::from_str(&value),
            ) {
                h.insert(n, v);
            }
        };
        put(format!("x-ratelimit-limit-{kind}"), w.limit.to_string());
        put(
            format!("x-ratelimit-remaining-{kind}"),
            w.remaining.to_string(),
        );
        put(format!("x-ratelimit-reset-{kind}"), duration(w.reset_ms));
    }
    if !a.allowed {
        let reset = [a.requests, a.tokens]
            .iter()
            .flatten()
            .map(|w| w.reset_ms)
            .max()
            .unwrap_or(1000);
        h.insert(
            "retry-after",
            HeaderValue::from(reset.div_ceil(1000).max(1)),
        );
    }
}

/// A duration as OpenAI writes it: `250ms`, `12.5s`, `1m3s`.
fn duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, s) = (ms / 60_000, (ms % 60_000) as f64 / 1000.0);
    let s = format!("{s:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai_s() {
        assert_eq!(duration(250), "250ms");
        assert_eq!(duration(12_500), "12.5s");
        assert_eq!(duration(60_000), "1m0s");
        assert_eq!(duration(63_250), "1m3.25s");
    }

    #[test]
    fn tokens_are_the_prompt_estimate_plus_what_is_asked() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
        assert_eq!(token_cost(body), (body.len() as u64).div_ceil(4) + 10);
        let body = br#"{"prompt":"hi","max_completion_tokens":3,"max_tokens":9}"#;
        assert_eq!(token_cost(body), (body.len() as u64).div_ceil(4) + 3);
        assert_eq!(token_cost(br#"{"a":1,"b":2}"#), 0, "not a completion");
        assert_eq!(token_cost(b"not json"), 0);
    }
}
