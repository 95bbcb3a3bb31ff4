//! The caller's OpenAI-compatible endpoints: `POST /v1/chat/completions`
//! (`http::run_inference_over_http`), `POST /v1/completions`, `GET /v1/models`, and the mesh
//! function `inference::get_response` (a whole generation, for any worker that wants one).
//! Requests are validated here; generation happens on the infer worker, reached through the gateway.

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api::{Choice, Completion, GenerateEvent, GenerateRequest, ModelList, Prompt};
use crate::openai::{self, Kind, Shaper};
use crate::protocol::{self, ErrorBody, ErrorCode, HttpResponseHead, RouteHint};
use crate::worker::{Call, CallStream, Mesh, Response, Worker};

const INFERENCE: &[&str] = &["inference::run_inference"];

pub fn register(worker: Worker) -> Worker {
    worker
        .function("http::run_inference_over_http", |call| {
            over_http(Kind::Chat, call)
        })
        .function("http::run_completion_over_http", |call| {
            over_http(Kind::Completion, call)
        })
        .function("http::run_response_over_http", over_http_responses)
        .function("http::embeddings", embeddings)
        .function("http::list_models", list_models)
        .function("inference::get_response", |call: Call| async move {
            let req: GenerateRequest = protocol::from_payload(&call.payload)?;
            let done = get_response(&call.mesh, &req, &call.trace_id, call.deadline).await?;
            Ok(Response::payload(protocol::to_payload(&done)))
        })
        .trigger(
            "POST",
            "/v1/chat/completions",
            "http::run_inference_over_http",
            INFERENCE,
        )
        .trigger(
            "POST",
            "/v1/completions",
            "http::run_completion_over_http",
            INFERENCE,
        )
        .trigger(
            "POST",
            "/v1/responses",
            "http::run_response_over_http",
            INFERENCE,
        )
        .trigger(
            "POST",
            "/v1/embeddings",
            "http::embeddings",
            &["inference::embed"],
        )
        .trigger(
            "GET",
            "/v1/models",
            "http::list_models",
            &["inference::models"],
        )
}

fn head(status: u16, content_type: &str) -> Option<HttpResponseHead> {
    let mut headers = vec![("content-type".to_string(), content_type.to_string())];
    if content_type.starts_with("text/event-stream") {
        headers.push(("cache-control".into(), "no-cache".into()));
    }
    Some(HttpResponseHead { status, headers })
}

fn json_response(value: &Value) -> Response {
    Response::Full {
        payload: value.to_string().into_bytes(),
        http: head(200, "application/json"),
    }
}

fn broken(why: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Internal,
        format!("inference stream broken: {why}"),
    )
}

async fn start(
    mesh: &Mesh,
    req: &GenerateRequest,
    trace_id: &str,
    deadline: Instant,
) -> Result<(CallStream, String), ErrorBody> {
    let mut stream = mesh
        .call_stream_routed(
            "inference::run_inference",
            Some(route_hint(req)),
            protocol::to_payload(req),
            trace_id,
            deadline,
        )
        .await?;
    match stream.next().await {
        Some(Ok(b)) => match protocol::from_payload::<GenerateEvent>(&b)? {
            GenerateEvent::Start { model, .. } => Ok((stream, model)),
            other => Err(broken(&format!("expected start, got {other:?}"))),
        },
        Some(Err(e)) => Err(e),
        None => Err(broken("ended before it started")),
    }
}

/// Where a generation should run: on a worker serving its model, and for a conversation, on the
/// worker that ran its earlier turns (its KV cache holds them). The affinity key hashes how the
/// conversation starts (every message up to the first user message, which every later turn
/// resends unchanged) or, for a text prompt, its first KiB.
pub fn route_hint(req: &GenerateRequest) -> RouteHint {
    const PREFIX: usize = 1024;
    let mut h = protocol::Fnv::default();
    h.write(req.model.as_deref().unwrap_or("").as_bytes());
    match &req.prompt {
        Prompt::Text { text } => h.write(&text.as_bytes()[..text.len().min(PREFIX)]),
        Prompt::Chat { messages } => {
            let first_user = messages.iter().position(|m| m.role == "user");
            let end = first_user.map_or(messages.len().min(1), |i| i + 1);
            for m in &messages[..end] {
                h.write(m.role.as_bytes());
                h.write(&[0]);
                h.write(m.content.as_bytes());
                h.write(&[0]);
            }
        }
    }
    RouteHint {
        model: req.model.clone(),
        affinity: Some(h.0),
    }
}

/// Runs a whole generation through `inference::run_inference`.
pub async fn get_response(
    mesh: &Mesh,
    req: &GenerateRequest,
    trace_id: &str,
    deadline: Instant,
) -> Result<Completion, ErrorBody> {
    let (mut stream, model) = start(mesh, req, trace_id, deadline).await?;
    let n = usize::from(req.n.max(1));
    let mut choices: Vec<Choice> = (0..n)
        .map(|_| Choice {
            text: String::new(),
            finish_reason: crate::api::FinishReason::Stop,
            completion_tokens: 0,
            logprobs: req.logprobs.map(|_| Vec::new()),
        })
        .collect();
    let mut left = n;
    let (mut prompt, mut cached) = (0, 0);
    let choice = |i: u8| usize::from(i).min(n - 1);
    while left > 0 {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                ErrorBody::new(
                    ErrorCode::DeadlineExceeded,
                    "the generation did not finish in time",
                )
            })?;
        match next {
            Some(Ok(b)) => match protocol::from_payload::<GenerateEvent>(&b)? {
                GenerateEvent::Delta { text, index } => choices[choice(index)].text.push_str(&text),
                GenerateEvent::Logprobs { tokens, index } => {
                    if let Some(all) = choices[choice(index)].logprobs.as_mut() {
                        all.extend(tokens);
                    }
                }
                GenerateEvent::Done {
                    index,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                } => {
                    let c = &mut choices[choice(index)];
                    c.finish_reason = finish_reason;
                    c.completion_tokens = completion_tokens;
                    if index == 0 {
                        (prompt, cached) = (prompt_tokens, cached_tokens);
                    }
                    left -= 1;
                }
                GenerateEvent::Start { .. } => {}
            },
            Some(Err(e)) => return Err(e),
            None => return Err(broken("ended without a finish")),
        }
    }
    let first = choices.remove(0);
    Ok(Completion {
        model,
        text: first.text,
        finish_reason: first.finish_reason,
        prompt_tokens: prompt,
        completion_tokens: first.completion_tokens,
        cached_tokens: cached,
        logprobs: first.logprobs,
        more: choices,
    })
}

async fn over_http(kind: Kind, call: Call) -> Result<Response, ErrorBody> {
    let valid = openai::validate(kind, &call.payload, rand::random())?;
    tracing::debug!(stream = valid.stream, max_tokens = ?valid.generate.max_tokens, "validated");
    if !valid.stream {
        let done = get_response(&call.mesh, &valid.generate, &call.trace_id, call.deadline).await?;
        return Ok(json_response(
            &Shaper::new(kind, done.model.clone())
                .with_tool(valid.tool)
                .full(&done),
        ));
    }
    let (stream, model) = start(&call.mesh, &valid.generate, &call.trace_id, call.deadline).await?;
    let (tx, chunks) = mpsc::channel(64);
    let shaper = Shaper::new(kind, model).with_tool(valid.tool);
    tokio::spawn(pump_sse(
        stream,
        shaper,
        valid.include_usage,
        call.deadline,
        valid.generate.n,
        tx,
    ));
    Ok(Response::Stream {
        http: head(200, "text/event-stream"),
        chunks,
    })
}

/// The next generation event of a stream being relayed, at most until `deadline`; `None` once
/// the client has left (dropping the stream then cancels the generation).
async fn next_event(
    stream: &mut CallStream,
    deadline: Instant,
    tx: &mpsc::Sender<Result<Bytes, ErrorBody>>,
) -> Option<Result<GenerateEvent, ErrorBody>> {
    let next = tokio::select! {
        _ = tx.closed() => return None,
        n = tokio::time::timeout_at(deadline, stream.next()) => n,
    };
    Some(match next {
        Err(_) => Err(ErrorBody::new(
            ErrorCode::DeadlineExceeded,
            "the generation did not finish in time",
        )),
        Ok(Some(Ok(b))) => protocol::from_payload::<GenerateEvent>(&b),
        Ok(Some(Err(e))) => Err(e),
        Ok(None) => Err(broken("ended without a finish")),
    })
}

/// `POST /v1/responses`: the Responses API, whole or as its stream of typed events.
async fn over_http_responses(call: Call) -> Result<Response, ErrorBody> {
    let valid = crate::responses::validate(&call.payload, rand::random())?;
    if !valid.stream {
        let done = get_response(&call.mesh, &valid.generate, &call.trace_id, call.deadline).await?;
        let shaper = crate::responses::Shaper::new(done.model.clone(), &valid);
        return Ok(json_response(&shaper.full(&done)));
    }
    let (mut stream, model) =
        start(&call.mesh, &valid.generate, &call.trace_id, call.deadline).await?;
    let (tx, chunks) = mpsc::channel(64);
    let mut shaper = crate::responses::Shaper::new(model.clone(), &valid);
    let deadline = call.deadline;
    tokio::spawn(async move {
        for e in shaper.opening() {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        loop {
            let Some(event) = next_event(&mut stream, deadline, &tx).await else {
                return;
            };
            match event {
                Ok(GenerateEvent::Start { .. } | GenerateEvent::Logprobs { .. }) => {}
                Ok(GenerateEvent::Delta { text, .. }) => {
                    if tx.send(Ok(shaper.delta(&text))).await.is_err() {
                        return;
                    }
                }
                Ok(GenerateEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    ..
                }) => {
                    let done = crate::api::Completion {
                        model,
                        text: String::new(),
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                        logprobs: None,
                        more: Vec::new(),
                    };
                    for e in shaper.closing(done) {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "generation failed mid-stream");
                    let _ = tx.send(Ok(shaper.failed(&e))).await;
                    return;
                }
            }
        }
    });
    Ok(Response::Stream {
        http: head(200, "text/event-stream"),
        chunks,
    })
}

/// Turns generation events into server-sent events until the end, an error, or the client leaves
/// (then dropping `stream` cancels the generation on the infer worker).
async fn pump_sse(
    mut stream: CallStream,
    shaper: Shaper,
    include_usage: bool,
    deadline: Instant,
    n: u8,
    tx: mpsc::Sender<Result<Bytes, ErrorBody>>,
) {
    let send = |b: Bytes| tx.send(Ok(b));
    let n = usize::from(n.max(1));
    // Per choice: log-probabilities waiting for their text, and the text sent so far.
    let mut pending: Vec<Vec<crate::api::TokenLogprob>> = vec![Vec::new(); n];
    let mut offset = vec![0; n];
    let mut left = n;
    let mut completion_total = 0;
    let mut cached = 0;
    let at = |chunk: &mut Value, i: usize| chunk["choices"][0]["index"] = json!(i);
    let choice = |i: u8| usize::from(i).min(n - 1);
    // A call to one named function streams its arguments as they come; a choice among several
    // is sent whole at the end, once the name is known.
    let named = match &shaper.tool {
        Some((openai::ToolCall::Named(name), _)) => Some(name.clone()),
        _ => None,
    };
    let mut whole_call = String::new();
    let first = match (&named, &shaper.tool) {
        (Some(name), _) => shaper.tool_chunk(Some(name), "", true),
        (None, Some(_)) => shaper.chunk(None, true, None),
        (None, None) => shaper.chunk(Some(""), true, None),
    };
    if shaper.kind == Kind::Chat {
        for i in 0..n {
            let mut first = first.clone();
            at(&mut first, i);
            if send(openai::sse(&first)).await.is_err() {
                return;
            }
        }
    }
    loop {
        let Some(event) = next_event(&mut stream, deadline, &tx).await else {
            return;
        };
        let sent = match event {
            Ok(GenerateEvent::Start { .. }) => Ok(()),
            Ok(GenerateEvent::Logprobs { tokens, index }) => {
                pending[choice(index)].extend(tokens);
                Ok(())
            }
            Ok(GenerateEvent::Delta { text, .. }) if shaper.tool.is_some() && named.is_none() => {
                whole_call.push_str(&text);
                Ok(())
            }
            Ok(GenerateEvent::Delta { text, index }) => {
                let i = choice(index);
                let mut chunk = if named.is_some() {
                    shaper.tool_chunk(None, &text, false)
                } else {
                    shaper.chunk(Some(&text), false, None)
                };
                at(&mut chunk, i);
                with_logprobs(&mut chunk, &shaper, &mut pending[i], offset[i]);
                offset[i] += text.len();
                send(openai::sse(&chunk)).await
            }
            Ok(GenerateEvent::Done {
                index,
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            }) => {
                let i = choice(index);
                completion_total += completion_tokens;
                if index == 0 {
                    cached = cached_tokens;
                }
                left -= 1;
                if let (None, Some((name, arguments))) = (&named, shaper.split_call(&whole_call)) {
                    let _ = send(openai::sse(&shaper.tool_chunk(
                        Some(&name),
                        &arguments,
                        false,
                    )))
                    .await;
                }
                if !pending[i].is_empty() {
                    // Tokens whose text a stop string swallowed: their log-probabilities still go.
                    let mut chunk = shaper.chunk(Some(""), false, None);
                    at(&mut chunk, i);
                    with_logprobs(&mut chunk, &shaper, &mut pending[i], offset[i]);
                    let _ = send(openai::sse(&chunk)).await;
                }
                let mut last = shaper.chunk(None, false, Some(finish_reason));
                last["choices"][0]["finish_reason"] = json!(shaper.finish_name(finish_reason));
                at(&mut last, i);
                let _ = send(openai::sse(&last)).await;
                if left > 0 {
                    continue;
                }
                if include_usage {
                    let _ = send(openai::sse(&shaper.usage_chunk(
                        prompt_tokens,
                        completion_total,
                        cached,
                    )))
                    .await;
                }
                let _ = send(Bytes::from_static(openai::SSE_DONE)).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "generation failed mid-stream");
                let _ = send(openai::sse(&e.openai_json())).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Puts the log-probabilities received since the last chunk on `chunk`.
fn with_logprobs(
    chunk: &mut Value,
    shaper: &Shaper,
    pending: &mut Vec<crate::api::TokenLogprob>,
    offset: usize,
) {
    if !pending.is_empty() {
        let tokens = std::mem::take(pending);
        chunk["choices"][0]["logprobs"] = openai::logprobs_json(shaper.kind, &tokens, offset);
    }
}

/// `POST /v1/embeddings`: `input` (a string, strings, token ids, or lists of them) embedded by
/// the served model, one L2-normalised vector each, as floats or base64.
async fn embeddings(call: Call) -> Result<Response, ErrorBody> {
    use base64::Engine as _;
    let (req, base64) = openai::validate_embeddings(&call.payload)?;
    let route = RouteHint {
        model: req.model.clone(),
        affinity: None,
    };
    let reply = call
        .mesh
        .call_routed(
            "inference::embed",
            Some(route),
            protocol::to_payload(&req),
            &call.trace_id,
            call.deadline,
        )
        .await?;
    let reply: crate::api::EmbedReply = protocol::from_payload(&reply)?;
    let data: Vec<Value> = reply
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(json_response(&json!({
        "object": "list", "data": data, "model": reply.model,
        "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
    })))
}

/// Every model a live infer worker serves (the gateway knows which), each with what one of its
/// workers knows of it.
async fn list_models(call: Call) -> Result<Response, ErrorBody> {
    let ask = |function: &'static str, model: Option<String>| {
        let route = model.map(|m| RouteHint {
            model: Some(m),
            affinity: None,
        });
        call.mesh
            .call_routed(function, route, Vec::new(), &call.trace_id, call.deadline)
    };
    let served: ModelList = protocol::from_payload(&ask("mesh::models", None).await?)?;
    let mut infos = Vec::new();
    for id in &served.models {
        // A worker that left since is skipped: the list says what is served now.
        if let Ok(reply) = ask("inference::models", Some(id.clone())).await {
            let list: ModelList = protocol::from_payload(&reply)?;
            infos.extend(list.info.into_iter().filter(|i| &i.id == id));
        }
    }
    let data: Vec<Value> = served
        .models
        .iter()
        .map(|id| {
            let mut m = json!({"id": id, "object": "model", "created": 0, "owned_by": "meshd"});
            // Beyond OpenAI's four fields: what the worker knows of the model.
            if let Some(info) = infos.iter().find(|info| &info.id == id) {
                m["context_length"] = json!(info.context_length);
                if info.trained_context_length > 0 {
                    m["trained_context_length"] = json!(info.trained_context_length);
                }
                if !info.quantization.is_empty() {
                    m["quantization"] = json!(info.quantization);
                }
                if info.parameters > 0 {
                    m["parameters"] = json!(info.parameters);
                }
            }
            m
        })
        .collect();
    Ok(json_response(&json!({"object": "list", "data": data})))
}
