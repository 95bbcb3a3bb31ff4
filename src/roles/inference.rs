//! The infer role's model functions: `inference::run_inference` (streams a generation),
//! `inference::models` and `inference::stats`, all over one [`Generate`] (the llama.cpp engine,
//! or the echo stand-in in tests of the mesh).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::api::{GenerateEvent, GenerateRequest, ModelList, ValidGenerate};
use crate::engine::{EngineError, Event, Generate};
use crate::protocol::{self, ErrorBody, ErrorCode, HttpResponseHead};
use crate::worker::{Call, Response, Worker};

/// Adds the model's functions to an infer worker.
pub fn register(worker: Worker, engine: Arc<dyn Generate>) -> Worker {
    let (e1, e2, e3, e4) = (engine.clone(), engine.clone(), engine.clone(), engine);
    worker
        .serving(e1.model_id())
        .function("inference::embed", move |call| embed(e4.clone(), call))
        .resumable_function("inference::run_inference", move |call| {
            run_inference(e1.clone(), call)
        })
        .function("inference::models", move |_call| {
            let models = ModelList {
                models: vec![e2.model_id().to_string()],
                info: vec![e2.model_info()],
            };
            async move { Ok(Response::payload(protocol::to_payload(&models))) }
        })
        .function("inference::stats", move |_call| {
            let body = serde_json::to_vec(&e3.snapshot()).expect("stats serialize");
            async move {
                Ok(Response::Full {
                    payload: body,
                    http: Some(HttpResponseHead {
                        status: 200,
                        headers: vec![("content-type".into(), "application/json".into())],
                    }),
                })
            }
        })
        .trigger("GET", "/v1/engine/stats", "inference::stats", &[])
}

/// `inference::embed`: one vector per input, from the served model.
async fn embed(engine: Arc<dyn Generate>, call: Call) -> Result<Response, ErrorBody> {
    let req: crate::api::EmbedRequest = protocol::from_payload(&call.payload)?;
    if req.inputs.is_empty() || req.inputs.len() > crate::api::MAX_EMBED_INPUTS {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "`input` must hold 1 to {} items",
                crate::api::MAX_EMBED_INPUTS
            ),
        )
        .with_param("input"));
    }
    if let Some(m) = req.model.as_deref().filter(|m| *m != engine.model_id()) {
        return Err(ErrorBody::new(
            ErrorCode::ModelNotFound,
            format!("The model `{m}` does not exist"),
        )
        .with_param("model"));
    }
    let (vectors, prompt_tokens) = engine
        .embed(&req.inputs)
        .await
        .map_err(|e| engine_error(e).with_param("input"))?;
    let reply = crate::api::EmbedReply {
        model: engine.model_id().to_string(),
        vectors,
        prompt_tokens,
    };
    Ok(Response::payload(protocol::to_payload(&reply)))
}

/// The one table from engine errors to mesh errors.
pub fn engine_error(e: EngineError) -> ErrorBody {
    let msg = e.to_string();
    match e {
        EngineError::ContextLength { .. } => {
            ErrorBody::new(ErrorCode::ContextLengthExceeded, msg).with_param("messages")
        }
        EngineError::Invalid(m) if m.starts_with("response_format") => {
            ErrorBody::new(ErrorCode::BadRequest, msg).with_param("response_format")
        }
        EngineError::Invalid(_) => ErrorBody::new(ErrorCode::BadRequest, msg),
        EngineError::Overloaded { .. } => ErrorBody::new(ErrorCode::Overloaded, msg),
        EngineError::Load { .. } | EngineError::Stopped => ErrorBody::new(ErrorCode::NoWorker, msg),
        EngineError::Decode(_) => ErrorBody::new(ErrorCode::Internal, msg),
        EngineError::Unavailable(_) => ErrorBody::new(ErrorCode::NoWorker, msg),
        EngineError::Upstream { status, message } => match status {
            400 if message.contains("context") => {
                ErrorBody::new(ErrorCode::ContextLengthExceeded, message).with_param("messages")
            }
            400 | 422 => ErrorBody::new(ErrorCode::BadRequest, message),
            404 => ErrorBody::new(ErrorCode::ModelNotFound, message).with_param("model"),
            429 | 503 => ErrorBody::new(ErrorCode::Overloaded, message),
            // Its key refused, or it failed: not the client's doing.
            _ => ErrorBody::new(ErrorCode::BadWorkerAnswer, msg),
        },
    }
}

async fn run_inference(engine: Arc<dyn Generate>, call: Call) -> Result<Response, ErrorBody> {
    let req: GenerateRequest = protocol::from_payload(&call.payload)?;
    let req = ValidGenerate::try_from(req)?;
    if let Some(model) = req.model() {
        if model != engine.model_id() {
            return Err(ErrorBody::new(
                ErrorCode::ModelNotFound,
                format!(
                    "The model `{model}` does not exist; this server serves `{}`",
                    engine.model_id()
                ),
            )
            .with_param("model"));
        }
    }
    let mut choices_left = req.n();
    // Formatting and tokenizing a long prompt takes a while: keep it off the async threads.
    let e = engine.clone();
    let generation = tokio::task::spawn_blocking(move || e.generate(&req))
        .await
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("prompt preparation failed: {e}"),
            )
        })?
        .map_err(engine_error)?;
    let (prompt_tokens, mut events) = (generation.prompt_tokens, generation.events);
    let (tx, chunks) = mpsc::channel::<Result<Bytes, ErrorBody>>(64);
    let started = call.started.clone();
    let start = GenerateEvent::Start {
        model: engine.model_id().to_string(),
        prompt_tokens,
    };
    tokio::spawn(async move {
        let encode = |e: &GenerateEvent| Ok(Bytes::from(protocol::to_payload(e)));
        if tx.send(encode(&start)).await.is_err() {
            return;
        }
        loop {
            // Stop as soon as nobody listens: dropping `events` frees the slot in the engine.
            let event = tokio::select! {
                _ = tx.closed() => return,
                e = events.recv() => e,
            };
            let (index, event) = match event {
                Some(Event::Choice(i, e)) => (i, Some(*e)),
                other => (0, other),
            };
            let (item, last) = match event {
                Some(Event::Started) => {
                    started.mark();
                    continue;
                }
                Some(Event::Delta(text)) => (encode(&GenerateEvent::Delta { text, index }), false),
                Some(Event::Logprobs(tokens)) => {
                    (encode(&GenerateEvent::Logprobs { tokens, index }), false)
                }
                Some(Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                }) => {
                    let done = GenerateEvent::Done {
                        index,
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    };
                    // The stream ends when every choice has.
                    choices_left = choices_left.saturating_sub(1);
                    (encode(&done), choices_left == 0)
                }
                Some(Event::Choice(..)) => continue,
                Some(Event::Error(e)) => (Err(ErrorBody::new(ErrorCode::Internal, e)), true),
                None => {
                    let e = ErrorBody::new(ErrorCode::Internal, "the engine dropped the request");
                    (Err(e), true)
                }
            };
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    Ok(Response::Stream { http: None, chunks })
}
