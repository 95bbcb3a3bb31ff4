//! An OpenAI-compatible server (vLLM, SGLang, llama-server, TGI) as the generator: the infer
//! worker becomes a coordinator in front of a production engine. Requests stream through
//! (`/v1/chat/completions` or `/v1/completions`, `stream: true` with usage); the upstream's
//! refusals become ours with their meaning kept (400, 404, 429; 502 for what it should never say,
//! 503 when it cannot be reached); dropping a generation closes its upstream request, which the
//! upstream cancels. Its load (`/metrics`: vLLM's `vllm:num_requests_running/waiting`,
//! llama-server's `llamacpp:requests_processing/deferred`) is read once a second into the
//! engine statistics, and reported to the gateway with each heartbeat so routing counts work
//! the upstream holds for others too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{EngineError, Event, FinishReason, Generate, Generation, Stats};
use crate::api::{ModelInfo, Prompt, StatsSnapshot, ValidGenerate};

/// Longest one server-sent event from the upstream may be.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Longest the upstream's model list (`GET /v1/models`) may be.
const MAX_MODELS_BYTES: usize = 1 << 20;
/// Longest the upstream's `/metrics` page may be (vLLM's is ~100 KiB).
const MAX_METRICS_BYTES: usize = 4 << 20;
/// How much of a refusal's body is read (its message is in the first bytes).
const MAX_REFUSAL_BYTES: usize = 64 << 10;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL, e.g. `http://10.0.1.5:8000` (the `/v1/...` paths are appended).
    pub url: String,
    pub key: Option<String>,
    /// The id to serve; `None`: the upstream's first model.
    pub model_id: Option<String>,
    /// Requests in flight at once, plus `max_queued` waiting; beyond, 429.
    pub slots: u32,
    pub max_queued: usize,
    pub stall_limit: Duration,
    /// Longest the upstream may take to answer a request's head (its queue, then the prompt).
    pub head_timeout: Duration,
}

pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: UpstreamConfig,
    client: reqwest::Client,
    /// The upstream's own name for the model (sent in requests).
    upstream_model: String,
    info: ModelInfo,
    stats: Arc<Stats>,
    /// Requests the upstream reports running and waiting (for everyone), from its `/metrics`.
    upstream_running: AtomicU64,
    upstream_waiting: AtomicU64,
    stopped: tokio::sync::Notify,
}

impl Upstream {
    /// Asks the upstream what it serves; fails when it cannot be reached or serves nothing.
    pub async fn start(cfg: UpstreamConfig) -> Result<Upstream, EngineError> {
        let unavailable = |why: String| EngineError::Load {
            path: cfg.url.clone(),
            reason: why,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| unavailable(e.to_string()))?;
        let base = cfg.url.trim_end_matches('/').to_string();
        let mut req = client
            .get(format!("{base}/v1/models"))
            .timeout(Duration::from_secs(30));
        if let Some(k) = &cfg.key {
            req = req.bearer_auth(k);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| unavailable(format!("GET /v1/models: {e}")))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("GET /v1/models: {}", resp.status())));
        }
        let list = read_capped(resp, MAX_MODELS_BYTES)
            .await
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
            .map_err(|e| unavailable(format!("GET /v1/models: {e}")))?;
        let first = list["data"][0].clone();
        let upstream_model = first["id"]
            .as_str()
            .ok_or_else(|| unavailable("the upstream lists no model".into()))?
            .to_string();
        // The upstream's own id (`google/gemma-3-270m` on vLLM): what its users already know.
        let id = cfg
            .model_id
            .clone()
            .unwrap_or_else(|| upstream_model.clone());
        // llama-server names its context in `meta.n_ctx_train`; vLLM in `max_model_len`.
        let context = first["max_model_len"]
            .as_u64()
            .or(first["meta"]["n_ctx_train"].as_u64())
            .unwrap_or(0) as u32;
        let info = ModelInfo {
            id,
            context_length: context,
            trained_context_length: context,
            quantization: String::new(),
            parameters: first["meta"]["n_params"].as_u64().unwrap_or(0),
        };
        tracing::info!(upstream = %base, model = %upstream_model, id = %info.id, "serving an upstream engine");
        let inner = Arc::new(Inner {
            cfg: UpstreamConfig { url: base, ..cfg },
            client,
            upstream_model,
            info,
            stats: Arc::new(Stats::default()),
            upstream_running: AtomicU64::new(0),
            upstream_waiting: AtomicU64::new(0),
            stopped: tokio::sync::Notify::new(),
        });
        tokio::spawn(watch_load(Arc::downgrade(&inner)));
        Ok(Upstream { inner })
    }
}

/// Reads the upstream's `/metrics` once a second while the upstream generator lives.
async fn watch_load(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut req = inner
            .client
            .get(format!("{}/metrics", inner.cfg.url))
            .timeout(Duration::from_secs(2));
        if let Some(k) = &inner.cfg.key {
            req = req.bearer_auth(k);
        }
        let Ok(resp) = req.send().await else {
            continue;
        };
        if !resp.status().is_success() {
            continue;
        }
        let Ok(page) = read_capped(resp, MAX_METRICS_BYTES).await else {
            continue;
        };
        if let Some((running, waiting)) = parse_load(&String::from_utf8_lossy(&page)) {
            inner.upstream_running.store(running, Ordering::Relaxed);
            inner.upstream_waiting.store(waiting, Ordering::Relaxed);
        }
    }
}

/// At most `limit` bytes of a response body, reading no further (a lying upstream cannot fill our
/// memory), and how the body ended.
async fn read_up_to(resp: reqwest::Response, limit: usize) -> (Vec<u8>, BodyEnd) {
    let mut body = resp.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (out, BodyEnd::Broken(e.to_string())),
        };
        if out.len() + chunk.len() > limit {
            out.extend_from_slice(&chunk[..limit - out.len()]);
            return (out, BodyEnd::Cut);
        }
        out.extend_from_slice(&chunk);
    }
    (out, BodyEnd::Whole)
}

enum BodyEnd {
    Whole,
    /// More than the limit: the rest was not read.
    Cut,
    Broken(String),
}

/// A whole body of at most `limit` bytes, or why not.
async fn read_capped(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    match read_up_to(resp, limit).await {
        (body, BodyEnd::Whole) => Ok(body),
        (_, BodyEnd::Cut) => Err(format!("the answer is over {limit} bytes")),
        (_, BodyEnd::Broken(e)) => Err(e),
    }
}

/// The start of a refusal's body, however it ended: the part that holds its message.
async fn refusal_text(resp: reqwest::Response) -> String {
    String::from_utf8_lossy(&read_up_to(resp, MAX_REFUSAL_BYTES).await.0).into_owned()
}

/// Running and waiting requests from a vLLM or llama-server Prometheus page.
fn parse_load(metrics: &str) -> Option<(u64, u64)> {
    let value = |names: &[&str]| -> Option<u64> {
        let mut total = None;
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let (name, v) = line.rsplit_once(' ')?;
            let bare = name.split('{').next().unwrap_or(name);
            if names.contains(&bare) {
                let v: f64 = v.parse().ok()?;
                *total.get_or_insert(0) += v.max(0.0) as u64;
            }
        }
        total
    };
    let running = value(&["vllm:num_requests_running", "llamacpp:requests_processing"])?;
    let waiting = value(&["vllm:num_requests_waiting", "llamacpp:requests_deferred"]).unwrap_or(0);
    Some((running, waiting))
}

impl Inner {
    fn body(&self, req: &ValidGenerate) -> (&'static str, Value) {
        let s = req.sampling();
        let mut body = json!({
            "model": self.upstream_model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": s.temperature,
            "top_p": s.top_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "seed": s.seed,
        });
        if let Some(n) = req.max_tokens() {
            body["max_tokens"] = json!(n);
        }
        if !req.stop().is_empty() {
            body["stop"] = json!(req.stop());
        }
        // The upstream engine constrains its own decoding (vLLM, llama-server and SGLang do).
        match req.format() {
            Some(crate::api::OutputFormat::JsonObject) => {
                body["response_format"] = json!({"type": "json_object"});
            }
            Some(crate::api::OutputFormat::JsonSchema { name, schema }) => {
                let schema: Value = serde_json::from_str(schema).unwrap_or(json!({}));
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": true},
                });
            }
            None => {}
        }
        // Beyond OpenAI's fields, only when set: vLLM and llama-server read them, others ignore them.
        if s.top_k > 0 {
            body["top_k"] = json!(s.top_k);
        }
        if s.min_p > 0.0 {
            body["min_p"] = json!(s.min_p);
        }
        if s.repetition_penalty != 1.0 {
            body["repetition_penalty"] = json!(s.repetition_penalty);
        }
        match req.prompt() {
            Prompt::Text { text } => {
                body["prompt"] = json!(text);
                ("/v1/completions", body)
            }
            Prompt::Chat { messages } => {
                body["messages"] = json!(messages
                    .iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect::<Vec<_>>());
                ("/v1/chat/completions", body)
            }
        }
    }
}

/// An upstream's refusal, as one of ours.
fn refusal(status: reqwest::StatusCode, body: &str) -> EngineError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["message"].as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(500).collect());
    EngineError::Upstream {
        status: status.as_u16(),
        message,
    }
}

impl Generate for Upstream {
    fn model_id(&self) -> &str {
        &self.inner.info.id
    }

    fn model_info(&self) -> ModelInfo {
        self.inner.info.clone()
    }

    fn generate(&self, request: &ValidGenerate) -> Result<Generation, EngineError> {
        if request.logprobs().is_some() || request.n() > 1 {
            return Err(EngineError::Invalid(
                "logprobs and n > 1 are not relayed from an upstream engine yet (the openai backend)"
                    .into(),
            ));
        }
        let inner = Arc::clone(&self.inner);
        let stats = &inner.stats;
        let limit = u64::from(inner.cfg.slots) + inner.cfg.max_queued as u64;
        let held = stats.active.load(Ordering::Relaxed) + stats.queued.load(Ordering::Relaxed);
        if held >= limit {
            return Err(EngineError::Overloaded {
                queued: inner.cfg.max_queued,
            });
        }
        let (path, body) = inner.body(request);
        stats.queued.fetch_add(1, Ordering::Relaxed);
        let submitted = std::time::Instant::now();
        // Called off the async threads (`Generate::generate` may block): wait here for the
        // upstream's answer head, so its refusal is this request's error with its own status.
        let head = tokio::runtime::Handle::current().block_on(async {
            let mut req = inner
                .client
                .post(format!("{}{path}", inner.cfg.url))
                .json(&body);
            if let Some(k) = &inner.cfg.key {
                req = req.bearer_auth(k);
            }
            let resp = tokio::time::timeout(inner.cfg.head_timeout, req.send())
                .await
                .map_err(|_| {
                    EngineError::Unavailable(format!(
                        "the upstream did not answer within {} s (upstream_timeout_secs)",
                        inner.cfg.head_timeout.as_secs()
                    ))
                })?
                .map_err(|e| {
                    EngineError::Unavailable(format!("the upstream cannot be reached: {e}"))
                })?;
            if resp.status().is_success() {
                Ok(resp)
            } else {
                let status = resp.status();
                Err(refusal(status, &refusal_text(resp).await))
            }
        });
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        let resp = head?;
        stats.active.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = mpsc::channel(256);
        let _ = tx.try_send(Event::Started);
        tokio::runtime::Handle::current().spawn(relay(inner, resp, tx, submitted));
        Ok(Generation {
            // Counted by the upstream: known at the end, in `Done`.
            prompt_tokens: 0,
            events,
        })
    }

    fn snapshot(&self) -> StatsSnapshot {
        let i = &self.inner;
        let mut s = i
            .stats
            .snapshot(&i.info.id, i.cfg.slots, i.info.context_length);
        // What the upstream holds for everyone, when it says.
        s.active_sequences = s
            .active_sequences
            .max(i.upstream_running.load(Ordering::Relaxed));
        s.queued_sequences = s
            .queued_sequences
            .max(i.upstream_waiting.load(Ordering::Relaxed));
        s
    }

    fn progress(&self) -> crate::liveness::Progress {
        let i = &self.inner;
        let mut p = i.stats.progress();
        // What the upstream holds beyond this worker's own requests: other clients' work.
        let held =
            i.upstream_running.load(Ordering::Relaxed) + i.upstream_waiting.load(Ordering::Relaxed);
        p.backlog = held.saturating_sub(i.stats.active.load(Ordering::Relaxed));
        p
    }

    fn stall_limit(&self) -> Duration {
        self.inner.cfg.stall_limit
    }

    fn stopped(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.inner.stopped.notified())
    }
}

/// Relays one upstream stream as events until its end, an error, or the receiver leaves (then
/// dropping the response closes the upstream connection: the upstream cancels the request).
async fn relay(
    inner: Arc<Inner>,
    resp: reqwest::Response,
    tx: mpsc::Sender<Event>,
    submitted: std::time::Instant,
) {
    let stats = Arc::clone(&inner.stats);
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut finish = FinishReason::Stop;
    let (mut prompt, mut completion, mut cached) = (0u32, 0u32, 0u32);
    let mut first = true;
    let outcome: Result<(), String> = 'relay: loop {
        let chunk = tokio::select! {
            _ = tx.closed() => break 'relay Err(String::new()),
            c = body.next() => c,
        };
        let chunk = match chunk {
            None => break Err("the upstream ended its stream without [DONE]".into()),
            Some(Err(e)) => break Err(format!("the upstream stream broke: {e}")),
            Some(Ok(c)) => c,
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end).collect();
            let text = String::from_utf8_lossy(&event);
            for data in text.lines().filter_map(|l| l.strip_prefix("data:")) {
                let data = data.trim();
                if data == "[DONE]" {
                    break 'relay Ok(());
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    break 'relay Err(format!(
                        "the upstream sent an event that is not JSON: {data:.200}"
                    ));
                };
                if let Some(e) = v.get("error") {
                    let msg = e["message"].as_str().unwrap_or("an error");
                    break 'relay Err(format!("the upstream failed: {msg}"));
                }
                let choice = &v["choices"][0];
                let delta = choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str());
                if let Some(t) = delta.filter(|t| !t.is_empty()) {
                    if first {
                        first = false;
                        if let Ok(mut h) = stats.ttft.lock() {
                            h.observe(submitted.elapsed().as_secs_f64());
                        }
                    }
                    stats.decode_steps.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Event::Delta(t.to_string())).await.is_err() {
                        break 'relay Err(String::new());
                    }
                }
                if let Some(r) = choice["finish_reason"].as_str() {
                    finish = if r == "length" {
                        FinishReason::Length
                    } else {
                        FinishReason::Stop
                    };
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    let n = |x: &Value| x.as_u64().unwrap_or(0) as u32;
                    prompt = n(&u["prompt_tokens"]);
                    completion = n(&u["completion_tokens"]);
                    cached = n(&u["prompt_tokens_details"]["cached_tokens"]);
                }
            }
        }
        if buf.len() > MAX_EVENT_BYTES {
            break Err(format!(
                "the upstream sent an event over {MAX_EVENT_BYTES} bytes"
            ));
        }
    };
    stats.active.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Ok(()) => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
            stats
                .prompt_tokens
                .fetch_add(prompt.into(), Ordering::Relaxed);
            stats
                .completion_tokens
                .fetch_add(completion.into(), Ordering::Relaxed);
            stats
                .cached_tokens
                .fetch_add(cached.into(), Ordering::Relaxed);
            let _ = tx
                .send(Event::Done {
                    finish_reason: finish,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    cached_tokens: cached,
                })
                .await;
        }
        // The receiver left: the request is cancelled by dropping the stream here.
        Err(e) if e.is_empty() => {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream generation failed");
            let _ = tx.send(Event::Error(e)).await;
        }
    }
}

/// The end of the first complete server-sent event in `buf` (after its blank line).
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_read_from_vllm_and_llama_server_metrics() {
        let vllm = "# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3.0\nvllm:num_requests_waiting{model_name=\"m\"} 7.0\n";
        assert_eq!(parse_load(vllm), Some((3, 7)));
        let llama = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n";
        assert_eq!(parse_load(llama), Some((2, 1)));
        assert_eq!(parse_load("up 1\n"), None);
    }

    #[test]
    fn events_end_at_a_blank_line() {
        assert_eq!(find_event_end(b"data: 1\n\ndata: 2"), Some(9));
        assert_eq!(find_event_end(b"data: 1\r\n\r\n"), Some(11));
        assert_eq!(find_event_end(b"data: 1\n"), None);
    }

    #[test]
    fn refusals_keep_their_meaning() {
        let e = refusal(
            reqwest::StatusCode::BAD_REQUEST,
            r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#,
        );
        assert!(
            matches!(e, EngineError::Upstream { status: 400, ref message } if message.contains("context size"))
        );
        let e = refusal(reqwest::StatusCode::BAD_GATEWAY, "<html>oops</html>");
        assert!(
            matches!(e, EngineError::Upstream { status: 502, ref message } if message == "<html>oops</html>")
        );
    }
}
