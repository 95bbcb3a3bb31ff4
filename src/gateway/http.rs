//! The gateway's HTTP front (hyper): built-in endpoints, and every other request mapped through a
//! registered trigger to an invocation whose answer becomes the response — whole, or streamed.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::Instrument;

use super::registry::Reply;
use super::{LocalCall, Shared};
use crate::protocol::{ErrorBody, ErrorCode, HttpRequestHead, HttpResponseHead, Outcome};

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Headers a client sends that never reach a worker.
const PRIVATE_HEADERS: [&str; 6] = [
    "authorization",
    "cookie",
    "connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shared.closing.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match shared.http_budget.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                tracing::warn!(%peer, reason = %full, "closing HTTP connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc_shared = Arc::clone(&shared);
        let acceptor = crate::tls::acceptor(&shared.secrets().http_tls);
        let watcher = graceful.watcher();
        let header_timeout = shared.opts.http_header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let io = match crate::tls::accept(acceptor.as_ref(), stream).await {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                    return;
                }
            };
            let svc = service_fn(move |req| handle(req, Arc::clone(&svc_shared)));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // From the connection's start and after every response (keep-alive included):
                // a client that has not sent a whole request head by then is closed.
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let trace_id = trace_id_of(&req);
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    let sampled = crate::telemetry::sampled_root(traceparent);
    let span = crate::span!(sampled, "http", trace_id = %trace_id, method = %req.method(), path = %req.uri().path());
    crate::telemetry::extract(&span, traceparent);
    let (route, mut resp) = route(req, &shared, &trace_id)
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "answered"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    shared
        .metrics
        .http_request(&route, resp.status().as_u16(), start.elapsed());
    Ok(resp)
}

/// Answers one request; returns the route label for metrics with the response.
async fn route(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    trace_id: &str,
) -> (String, Response<Body>) {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET {
        match path.as_str() {
            "/healthz" => return (path, json(200, &serde_json::json!({"status": "ok"}))),
            "/readyz" if !wants_deep(&req) => return (path, readyz(shared)),
            _ => {}
        }
    }
    let key = match authorize(&req, &shared.secrets().api_keys) {
        Ok(key) => key,
        Err(e) => return ("unauthorized".into(), error(&e)),
    };
    if req.method() == Method::GET && path == "/readyz" {
        let (ok, body) = super::probe::deep(shared, trace_id).await;
        return (
            "/readyz?deep".into(),
            json(if ok { 200 } else { 503 }, &body),
        );
    }
    if req.method() == Method::GET {
        match path.as_str() {
            "/metrics" => {
                let engines = super::engine_stats(shared).await;
                let text = {
                    let reg = shared.registry();
                    let mut text =
                        shared
                            .metrics
                            .render(&reg.status(), reg.worker_count(), &engines);
                    crate::metrics::render_affinity(
                        &mut text,
                        reg.affinity_kept,
                        reg.affinity_overflowed,
                    );
                    text
                };
                let resp = Response::builder()
                    .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(full(text))
                    .expect("static response");
                return (path, resp);
            }
            "/status" => {
                let functions = shared.registry().status();
                return (
                    path,
                    json(200, &serde_json::json!({"functions": functions})),
                );
            }
            _ => {}
        }
    }
    let function = match shared.registry().trigger(req.method().as_str(), &path) {
        Ok(f) => f,
        Err(other_method) => {
            let err = if other_method {
                ErrorBody::new(
                    ErrorCode::MethodNotAllowed,
                    format!("{} is not allowed on {path}", req.method()),
                )
            } else {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no route for {} {path}", req.method()),
                )
            };
            return ("unmatched".into(), error(&err));
        }
    };
    let resp = invoke(req, shared, &function, trace_id, key.as_ref()).await;
    (path, resp)
}

async fn invoke(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    function: &str,
    trace_id: &str,
    key: Option<&crate::config::ApiKey>,
) -> Response<Body> {
    let limit = shared.opts.max_body_bytes;
    let too_large = || {
        error(&ErrorBody::new(
            ErrorCode::PayloadTooLarge,
            format!("request body exceeds the limit of {limit} bytes"),
        ))
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let deadline = shared.opts.http_body_timeout;
    let collected = match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await
    {
        Ok(collected) => collected,
        Err(_) => {
            let err = ErrorBody::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            );
            // The rest of the body may still be on its way: this connection serves no more.
            let mut resp = error(&err);
            resp.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    let body = match collected {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return too_large()
        }
        Err(e) => {
            let err = ErrorBody::new(ErrorCode::BadRequest, format!("cannot read body: {e}"));
            return error(&err);
        }
    };
    let admission = match key {
        Some(key) => super::limits::admit(&shared.state, key, &body).await,
        None => None,
    };
    let Some(admission) = admission else {
        return forward(shared, function, trace_id, parts, body).await;
    };
    let mut resp = if admission.allowed {
        forward(shared, function, trace_id, parts, body).await
    } else {
        error(&super::limits::refusal(&admission))
    };
    super::limits::headers(&mut resp, &admission);
    resp
}

/// Sends the request to its function and makes the answer the response.
async fn forward(
    shared: &Arc<Shared>,
    function: &str,
    trace_id: &str,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Response<Body> {
    let head = HttpRequestHead {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts
            .headers
            .iter()
            .filter(|(k, _)| !PRIVATE_HEADERS.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
    };
    let mut call = match shared.invoke_local(function, None, body, Some(head), trace_id) {
        Ok(c) => c,
        Err(e) => return error(&e),
    };
    let timeout = shared.opts.request_timeout;
    let first = tokio::select! {
        biased;
        r = tokio::time::timeout(timeout, call.replies.recv()) => r,
        _ = shared.closing.cancelled() => {
            // Draining: let it finish within the drain deadline instead of answering 503.
            tokio::time::timeout(shared.opts.drain_timeout, call.replies.recv()).await
        }
    };
    match first {
        Err(_) => error(&ErrorBody::new(
            ErrorCode::DeadlineExceeded,
            format!("`{function}` did not answer within {} s", timeout.as_secs()),
        )),
        Ok(None) => error(&ErrorBody::new(
            ErrorCode::Internal,
            "the invocation was dropped",
        )),
        Ok(Some(Reply::Done(Outcome::Ok { payload, http }))) => match valid_head(http, function) {
            Ok(head) => with_head(&head, full(payload.into_vec())),
            Err(e) => error(&e),
        },
        Ok(Some(Reply::Done(Outcome::Error(e)))) | Ok(Some(Reply::End(Some(e)))) => error(&e),
        Ok(Some(Reply::Start(head))) => {
            let head = match valid_head(head, function) {
                Ok(head) => head,
                Err(e) => return error(&e),
            };
            let sse = head.headers.iter().any(|(k, v)| {
                k.eq_ignore_ascii_case("content-type") && v.starts_with("text/event-stream")
            });
            let body = ReplyBody {
                call,
                sse,
                done: false,
            };
            with_head(&head, BodyExt::boxed_unsync(body))
        }
        Ok(Some(Reply::Chunk(_) | Reply::End(None))) => error(&ErrorBody::new(
            ErrorCode::Internal,
            "the worker streamed without starting a stream",
        )),
    }
}

/// A streamed answer. Dropping it early (the client left) drops the call, which cancels it.
struct ReplyBody {
    call: LocalCall,
    sse: bool,
    done: bool,
}

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let reply = match self.call.replies.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r,
            };
            let err = match reply {
                Some(Reply::Chunk(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Some(Reply::End(None)) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Some(Reply::End(Some(e))) | Some(Reply::Done(Outcome::Error(e))) => e,
                Some(Reply::Start(_)) | Some(Reply::Done(Outcome::Ok { .. })) => continue,
                None => ErrorBody::new(ErrorCode::Internal, "the stream was dropped"),
            };
            self.done = true;
            // An SSE client gets the error as an event; anything else sees the body break off.
            return Poll::Ready(Some(if self.sse {
                Ok(Frame::data(Bytes::from(format!(
                    "data: {}\n\n",
                    err.openai_json()
                ))))
            } else {
                Err(std::io::Error::other(err.to_string()))
            }));
        }
    }
}

/// Checks `Authorization: Bearer KEY` against the configured digests (constant time); answers
/// the key that matched (`None` when the API is open).
fn authorize(
    req: &Request<Incoming>,
    keys: &[crate::config::ApiKey],
) -> Result<Option<crate::config::ApiKey>, ErrorBody> {
    use subtle::{ConditionallySelectable, ConstantTimeEq};
    if keys.is_empty() {
        return Ok(None);
    }
    let unauthorized = |m: &str| ErrorBody::new(ErrorCode::InvalidApiKey, m);
    let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return Err(unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        ));
    };
    let key = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    let digest = crate::config::sha256(key.as_bytes());
    // Compare against every key, so the time taken does not depend on which one matched.
    let mut matched = subtle::Choice::from(0);
    let mut which = 0u32;
    for (i, k) in keys.iter().enumerate() {
        let eq = k.digest.ct_eq(&digest);
        which = u32::conditional_select(&which, &(i as u32), eq);
        matched |= eq;
    }
    if bool::from(matched) {
        Ok(Some(keys[which as usize].clone()))
    } else {
        Err(unauthorized("Incorrect API key provided."))
    }
}

/// `?deep=1` (or `deep=true`): run the whole chain instead of reading the registry.
fn wants_deep(req: &Request<Incoming>) -> bool {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv == "deep=1" || kv == "deep=true")
}

fn readyz(shared: &Shared) -> Response<Body> {
    let (missing, triggers, workers, stalled) = {
        let reg = shared.registry();
        let mut missing = reg.unserved_triggers();
        for (method, path) in &shared.opts.expected_triggers {
            if reg.trigger(method, path).is_err() {
                missing.push(format!("{method} {path} (not registered yet)"));
            }
        }
        (
            missing,
            reg.trigger_count(),
            reg.worker_count(),
            reg.stalled_workers(),
        )
    };
    let ready = triggers > 0 && missing.is_empty();
    let body = serde_json::json!({
        "ready": ready,
        "workers": workers,
        "triggers": triggers,
        "unserved_functions": missing,
        "stalled_workers": stalled,
    });
    json(if ready { 200 } else { 503 }, &body)
}

/// The trace id of a request: a valid `x-request-id`, else the trace of a `traceparent`, else new.
fn trace_id_of(req: &Request<Incoming>) -> String {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if let Some(id) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        if valid(id) {
            return id.to_string();
        }
    }
    if let Some(tp) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() == 4
            && parts[1].len() == 32
            && parts[1].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return parts[1].to_ascii_lowercase();
        }
    }
    format!("{:032x}", rand::random::<u128>())
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json(status: u16, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(value.to_string()))
        .expect("valid response")
}

/// The one place an error becomes an HTTP response.
pub fn error(e: &ErrorBody) -> Response<Body> {
    let mut resp = json(e.http_status(), &e.openai_json());
    if e.http_status() == 429 || e.http_status() == 503 {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    if e.http_status() == 401 {
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The head a worker's answer goes out with: its own (200 and no headers when it chose none), if
/// its status is a final HTTP status (200–599); else a clear 502 for the client instead.
fn valid_head(
    head: Option<HttpResponseHead>,
    function: &str,
) -> Result<HttpResponseHead, ErrorBody> {
    let head = head.unwrap_or(HttpResponseHead {
        status: 200,
        headers: vec![],
    });
    if (200..=599).contains(&head.status) {
        return Ok(head);
    }
    Err(ErrorBody::new(
        ErrorCode::BadWorkerAnswer,
        format!(
            "the worker serving `{function}` answered with HTTP status {}, which is not a final status",
            head.status
        ),
    ))
}

fn with_head(head: &HttpResponseHead, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK);
    for (k, v) in &head.headers {
        let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) else {
            continue;
        };
        if !PRIVATE_HEADERS.contains(&k.as_str()) && k != CONTENT_LENGTH {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_a_worker_makes_up_never_panic_and_never_pass_through() {
        for bogus in [0, 1, 99, 101, 199, 600, 1000, u16::MAX] {
            let e = ErrorBody {
                status: Some(bogus),
                ..ErrorBody::new(ErrorCode::Internal, "x")
            };
            assert_eq!(error(&e).status(), 500, "{bogus}");
            let head = HttpResponseHead {
                status: bogus,
                headers: vec![],
            };
            let err = valid_head(Some(head), "f").unwrap_err();
            assert_eq!(err.http_status(), 502);
            assert_eq!(err.code, "bad_worker_answer");
        }
        for fine in [200, 204, 404, 599] {
            let head = HttpResponseHead {
                status: fine,
                headers: vec![],
            };
            assert_eq!(valid_head(Some(head), "f").unwrap().status, fine);
        }
        assert_eq!(valid_head(None, "f").unwrap().status, 200);
    }
}
