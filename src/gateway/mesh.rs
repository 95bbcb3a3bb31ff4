//! The gateway's side of worker connections: handshake and authentication, then routing every
//! message a worker sends. A worker that leaves fails its in-flight invocations at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::builtins;
use super::grants::{Identity, Refusal};
use super::registry::{Pick, Reply, Sink, WorkerId};
use super::Shared;
use crate::protocol::{
    self, ErrorBody, HelloFrame, Message, Outcome, MAX_HELLO_FRAME, PROTOCOL_VERSION,
};
use crate::transport::{self, Outbox, Outgoing, RecvError};

/// A worker must say `Hello` within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_WORKER: AtomicU64 = AtomicU64::new(1);

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "mesh accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match shared.mesh_budget.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                tracing::warn!(%peer, reason = %full, "closing mesh connection");
                shared.metrics.worker_refused("connection_limit");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let acceptor = crate::tls::acceptor(&shared.secrets().mesh_tls);
        tokio::spawn(async move {
            let _permit = permit;
            match crate::tls::accept(acceptor.as_ref(), stream).await {
                Ok(io) => serve_worker(io, peer.to_string(), shared).await,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "mesh TLS handshake failed");
                    shared.metrics.worker_refused("tls");
                }
            }
        });
    }
}

async fn serve_worker(stream: crate::tls::BoxIo, peer: String, shared: Arc<Shared>) {
    // Before the token is checked: the upgrade and the Hello share one deadline, and no frame
    // may exceed MAX_HELLO_FRAME.
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let small = transport::ws_config(MAX_HELLO_FRAME);
    let upgrade = tokio_tungstenite::accept_async_with_config(stream, Some(small));
    let mut ws = match tokio::time::timeout_at(deadline, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "not a websocket handshake");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "no websocket upgrade within the handshake deadline");
            shared.metrics.worker_refused("handshake");
            return;
        }
    };
    let hello = tokio::time::timeout_at(deadline, transport::recv_hello(&mut ws)).await;
    let (name, identity) = match check_hello(hello, &shared) {
        Ok(known) => known,
        Err((kind, reason)) => {
            tracing::warn!(%peer, %reason, "worker refused");
            shared.metrics.worker_refused(kind);
            refuse(&mut ws, reason).await;
            return;
        }
    };
    // Authenticated: the same connection now takes frames up to the configured limit.
    let max = shared.opts.max_frame_bytes;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        ws.into_inner(),
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(transport::ws_config(max)),
    )
    .await;
    let (sink, mut stream) = ws.split();
    let (outbox, writer) = transport::spawn_writer(sink);

    let id = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
    shared
        .registry()
        .add_worker(id, name.clone(), outbox.clone());
    let _ = outbox
        .send(Outgoing::Msg(Message::Welcome {
            worker_id: id.to_string(),
        }))
        .await;
    let span = tracing::info_span!("worker", worker = %name, id, %peer, role = %identity.role);
    async {
        tracing::info!("worker connected");
        let me = Peer { id, identity };
        let (why, silent) = match read_loop(&me, &mut stream, &outbox, &shared).await {
            Left::Silent(why) => (why, true),
            Left::Closed(why) => (why, false),
        };
        let departure = shared.registry().remove_worker(id);
        if silent {
            tracing::warn!(reason = %why, orphaned = departure.orphaned.len(), "worker declared dead");
            shared.metrics.worker_lost("heartbeat");
        } else {
            tracing::info!(reason = %why, orphaned = departure.orphaned.len(), "worker disconnected");
        }
        let message = format!("worker `{name}` was lost while handling this request ({why})");
        shared.fail_departure(departure, &name, &message);
    }
    .instrument(span)
    .await;
    // A peer that stopped reading must not keep the writer (and the socket) forever.
    drop(outbox);
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// The worker's name and identity if its first frame is an acceptable `Hello`; else the refusal's
/// metric label and reason.
fn check_hello(
    hello: Result<Result<HelloFrame, RecvError>, tokio::time::error::Elapsed>,
    shared: &Shared,
) -> Result<(String, Identity), (&'static str, String)> {
    let hello = match hello {
        Err(_) => {
            return Err((
                "handshake",
                format!("no hello within {} s", HELLO_TIMEOUT.as_secs()),
            ))
        }
        Ok(Err(e)) => return Err(("handshake", format!("bad handshake: {e}"))),
        Ok(Ok(h)) => h,
    };
    if hello.kind != "hello" {
        return Err(("handshake", "first message must be hello".into()));
    }
    if hello.protocol != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {} is not supported (this gateway speaks {PROTOCOL_VERSION})",
            hello.protocol
        );
        return Err(("protocol", reason));
    }
    match shared.opts.identities.identify(&hello.token) {
        Some(identity) => Ok((hello.name, identity)),
        None if hello.token.is_empty() => Err(("token", "no worker token presented".into())),
        None => Err(("token", "wrong worker token".into())),
    }
}

/// Tells a refused peer why, and closes; never waits long on a peer that does not read.
async fn refuse<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, reason: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let refused = Message::Refused {
        reason: reason.clone(),
    };
    let say = async {
        if let Ok(bytes) = crate::protocol::encode(&refused) {
            ws.send(WsMessage::Binary(bytes.into())).await?;
        }
        ws.close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: reason.into(),
        }))
        .await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), say).await;
}

/// An authenticated worker connection: its id in the registry and what its token grants.
struct Peer {
    id: WorkerId,
    identity: Identity,
}

/// Why a worker's read loop ended.
enum Left {
    /// It fell silent for a heartbeat timeout: declared dead.
    Silent(String),
    /// Its connection closed or broke.
    Closed(String),
}

/// Reads a worker's messages until it leaves; answers why. Sends a heartbeat every interval and
/// declares the worker dead after a heartbeat timeout of silence.
async fn read_loop<S>(
    me: &Peer,
    stream: &mut futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<S>>,
    outbox: &Outbox,
    shared: &Arc<Shared>,
) -> Left
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let max = shared.opts.max_frame_bytes;
    let heartbeat = shared.opts.heartbeat;
    let mut ticker = heartbeat.ticker();
    let mut last_heard = std::time::Instant::now();
    let mut nonce = 0u64;
    loop {
        let received = tokio::select! {
            r = transport::recv(stream, max) => r,
            _ = tokio::time::sleep_until(heartbeat.deadline(last_heard)) => {
                return Left::Silent(heartbeat.silence(last_heard));
            }
            _ = ticker.tick() => {
                nonce += 1;
                let _ = outbox.try_send(Outgoing::Msg(Message::Ping {
                    nonce,
                    health: None,
                    gateways: Vec::new(),
                }));
                continue;
            }
        };
        let msg = match received {
            Err(RecvError::Closed(reason)) => return Left::Closed(format!("closed ({reason})")),
            Err(e) => {
                let reason = e.to_string();
                let _ = outbox.try_send(Outgoing::Close(reason.clone()));
                return Left::Closed(reason);
            }
            Ok(msg) => msg,
        };
        last_heard = std::time::Instant::now();
        if let Err(refusal) = handle(me, msg, outbox, shared).await {
            // A worker that oversteps its grant is told why and disconnected: it is either
            // misconfigured (the wrong role's token) or hostile, and serves nothing either way.
            tracing::warn!(reason = refusal.reason, refusal = %refusal.message, "worker refused");
            shared.metrics.worker_refused(refusal.reason);
            let refused = Message::Refused {
                reason: refusal.message.clone(),
            };
            let _ = outbox.try_send(Outgoing::Msg(refused));
            let _ = outbox.try_send(Outgoing::Close(refusal.message.clone()));
            return Left::Closed(format!("refused: {}", refusal.message));
        }
    }
}

/// Acts on one message of an authenticated worker; a registration outside its grant is refused.
async fn handle(
    peer: &Peer,
    msg: Message,
    outbox: &Outbox,
    shared: &Arc<Shared>,
) -> Result<(), Refusal> {
    let me = peer.id;
    let grant = &peer.identity.grant;
    match msg {
        Message::RegisterFunction {
            name,
            resumable,
            models,
            ..
        } => {
            if builtins::is_builtin(&name) || !grant.may_serve(&name) {
                return Err(peer.identity.refuse_function(&name));
            }
            // The grant decides; the worker's flag says it reports `Started`, without which
            // moving an invocation could run it twice.
            let resumable = resumable && grant.is_resumable(&name);
            shared
                .registry()
                .register_function(me, &name, resumable, &models)
                .map_err(|message| Refusal {
                    reason: "models",
                    message,
                })?;
            tracing::info!(function = %name, resumable, ?models, "function registered");
        }
        Message::UnregisterFunction { name } => shared.registry().unregister_function(me, &name),
        Message::RegisterTrigger {
            method,
            path,
            function,
            requires,
        } => {
            if !grant.may_bind(&method, &path, &function) {
                return Err(peer.identity.refuse_trigger(&method, &path, &function));
            }
            let bound =
                shared
                    .registry()
                    .register_trigger(&method, &path, &function, requires.clone());
            if let Err(owner) = bound {
                return Err(Refusal {
                    reason: "rebind",
                    message: format!(
                        "trigger `{method} {path}` is bound to `{owner}`; it cannot be re-bound to `{function}`"
                    ),
                });
            }
            tracing::info!(%method, %path, %function, ?requires, "trigger registered");
            // Off this connection's loop: a slow state backend never holds up a worker.
            let state = shared.state.clone();
            tokio::spawn(async move {
                if let Err(e) = state
                    .save_trigger(&method, &path, &function, &requires)
                    .await
                {
                    tracing::warn!(error = %e, "cannot remember the trigger");
                }
            });
        }
        Message::Invoke {
            id,
            function,
            payload,
            timeout_ms,
            trace_id,
            http,
            traceparent,
            route: hint,
        } => {
            if function == builtins::MODELS {
                let models = crate::api::ModelList {
                    models: shared.registry().models(),
                    info: Vec::new(),
                };
                let outcome = Outcome::Ok {
                    payload: serde_bytes::ByteBuf::from(protocol::to_payload(&models)),
                    http: None,
                };
                let _ = outbox
                    .send(Outgoing::Msg(Message::Result { id, outcome }))
                    .await;
                return Ok(());
            }
            if hint
                .as_ref()
                .and_then(|h| h.model.as_ref())
                .is_some_and(|m| m.len() > crate::api::MAX_MODEL_ID)
            {
                let outcome = Outcome::Error(
                    ErrorBody::new(
                        crate::protocol::ErrorCode::BadRequest,
                        format!(
                            "a route's model id may be at most {} bytes",
                            crate::api::MAX_MODEL_ID
                        ),
                    )
                    .with_param("model"),
                );
                let _ = outbox
                    .send(Outgoing::Msg(Message::Result { id, outcome }))
                    .await;
                return Ok(());
            }
            if builtins::is_builtin(&function) {
                let shared = Arc::clone(shared);
                let outbox = outbox.clone();
                let identity = peer.identity.clone();
                tokio::spawn(async move {
                    let outcome =
                        builtins::call(&shared.state, &identity, &function, &payload).await;
                    if let Outcome::Error(e) = &outcome {
                        if e.code == crate::protocol::ErrorCode::Forbidden.as_str() {
                            tracing::warn!(role = %identity.role, error = %e, "state call refused");
                            shared.metrics.worker_refused("state_scope");
                        }
                    }
                    let _ = outbox
                        .send(Outgoing::Msg(Message::Result { id, outcome }))
                        .await;
                });
                return Ok(());
            }
            // The gateway's hop in the trace: a span for the routing, child of the caller's.
            // A worker's traceparent is forwarded to another worker only when well formed.
            let traceparent = traceparent.filter(|t| crate::telemetry::is_traceparent(t));
            let sampled = crate::telemetry::sampled_child(traceparent.as_deref());
            let route = crate::span!(sampled, "route", %function, trace_id = %trace_id);
            crate::telemetry::extract(&route, traceparent.as_deref());
            let traceparent = crate::telemetry::inject(&route).or(traceparent);
            let routed = route.in_scope(|| {
                shared.registry().dispatch(
                    &function,
                    Pick::Route(hint.as_deref()),
                    Sink::Remote { worker: me, id },
                    Some((me, id)),
                    shared.opts.queue_depth,
                    |gid| Message::Invoke {
                        id: gid,
                        function: function.clone(),
                        payload,
                        timeout_ms,
                        trace_id,
                        http,
                        traceparent,
                        route: hint.clone(),
                    },
                )
            });
            if let Err(e) = routed {
                let outcome = Outcome::Error(e);
                let _ = outbox
                    .send(Outgoing::Msg(Message::Result { id, outcome }))
                    .await;
            }
        }
        Message::Result { id, outcome } => {
            let sink = shared.registry().complete(id, me);
            if let Some(sink) = sink {
                shared.deliver(id, sink, Reply::Done(outcome));
            }
        }
        Message::StreamStart { id, http } => {
            let sink = shared.registry().sink(id, me);
            if let Some(sink) = sink {
                shared.deliver(id, sink, Reply::Start(http));
            }
        }
        Message::StreamChunk { id, data } => {
            let sink = shared.registry().sink(id, me);
            if let Some(sink) = sink {
                let data = bytes::Bytes::from(data.into_vec());
                shared.deliver(id, sink, Reply::Chunk(data));
            }
        }
        Message::StreamEnd { id, error } => {
            let sink = shared.registry().complete(id, me);
            if let Some(sink) = sink {
                shared.deliver(id, sink, Reply::End(error));
            }
        }
        Message::Started { id } => shared.registry().started(id, me),
        Message::Cancel { id } => {
            let target = shared.registry().cancel_from_origin(me, id);
            if let Some(t) = target {
                t.try_send();
            }
        }
        Message::Draining {} => {
            tracing::info!("worker is draining; no new work goes to it");
            // Confirm under the registry lock: invokes are queued under it as they are routed,
            // so every one routed here is ahead of the confirmation on the connection.
            let queued = {
                let mut registry = shared.registry();
                registry.set_draining(me);
                outbox.try_send(Outgoing::Msg(Message::Draining {})).is_ok()
            };
            if !queued {
                let _ = outbox.send(Outgoing::Msg(Message::Draining {})).await;
            }
        }
        Message::Ping {
            nonce,
            health,
            gateways,
        } => {
            let _ = outbox.try_send(Outgoing::Msg(Message::Pong { nonce }));
            if let Some(health) = health {
                shared.worker_health(me, health);
            }
            if !gateways.is_empty() {
                shared.registry().set_gateways(me, gateways);
            }
        }
        Message::Pong { .. } | Message::Unknown => {}
        Message::Hello { .. } | Message::Welcome { .. } | Message::Refused { .. } => {
            let err = ErrorBody::new(
                crate::protocol::ErrorCode::BadRequest,
                "unexpected handshake message",
            );
            tracing::warn!(error = %err, "ignoring message");
        }
    }
    Ok(())
}
