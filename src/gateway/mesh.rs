//! The gateway's side of worker connections: handshake and authentication, then routing every
//! message a worker sends. A worker that leaves fails its in-flight invocations at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::builtins;
use super::registry::{Reply, Sink, WorkerId};
use super::Shared;
use crate::protocol::{ErrorBody, Message, Outcome, PROTOCOL_VERSION};
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
        let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing mesh connection");
            continue;
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
    let config = transport::ws_config(shared.opts.max_frame_bytes);
    let ws = match tokio_tungstenite::accept_async_with_config(stream, Some(config)).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "not a websocket handshake");
            return;
        }
    };
    let (sink, mut stream) = ws.split();
    let (outbox, writer) = transport::spawn_writer(sink);
    let max = shared.opts.max_frame_bytes;

    let hello = tokio::time::timeout(HELLO_TIMEOUT, transport::recv(&mut stream, max)).await;
    let name = match hello {
        Ok(Ok(Message::Hello {
            protocol,
            name,
            token,
        })) => {
            if protocol != PROTOCOL_VERSION {
                let reason = format!(
                    "protocol version {protocol} is not supported (this gateway speaks {PROTOCOL_VERSION})"
                );
                refuse(&shared, &outbox, &peer, "protocol", reason).await;
                return;
            }
            if !token_matches(&token, &shared.opts.token) {
                let reason = if token.is_empty() {
                    "no worker token presented"
                } else {
                    "wrong worker token"
                };
                refuse(&shared, &outbox, &peer, "token", reason.into()).await;
                return;
            }
            name
        }
        Ok(Ok(_)) => {
            refuse(
                &shared,
                &outbox,
                &peer,
                "handshake",
                "first message must be hello".into(),
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            refuse(
                &shared,
                &outbox,
                &peer,
                "handshake",
                format!("bad handshake: {e}"),
            )
            .await;
            return;
        }
        Err(_) => {
            refuse(
                &shared,
                &outbox,
                &peer,
                "handshake",
                "no hello within 10 s".into(),
            )
            .await;
            return;
        }
    };

    let id = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
    shared
        .registry()
        .add_worker(id, name.clone(), outbox.clone());
    let _ = outbox
        .send(Outgoing::Msg(Message::Welcome {
            worker_id: id.to_string(),
        }))
        .await;
    let span = tracing::info_span!("worker", worker = %name, id, %peer);
    async {
        tracing::info!("worker connected");
        let why = read_loop(id, &mut stream, &outbox, &shared).await;
        let departure = shared.registry().remove_worker(id);
        if why.starts_with("no heartbeat") {
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

async fn refuse(shared: &Shared, outbox: &Outbox, peer: &str, kind: &'static str, reason: String) {
    tracing::warn!(%peer, %reason, "worker refused");
    shared.metrics.worker_refused(kind);
    let _ = outbox
        .send(Outgoing::Msg(Message::Refused {
            reason: reason.clone(),
        }))
        .await;
    let _ = outbox.send(Outgoing::Close(reason)).await;
}

/// Constant-time comparison; an empty configured token refuses everyone.
fn token_matches(given: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Reads a worker's messages until it leaves; answers why. Sends a heartbeat every interval and
/// declares the worker dead after a heartbeat timeout of silence.
async fn read_loop<S>(
    me: WorkerId,
    stream: &mut futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<S>>,
    outbox: &Outbox,
    shared: &Arc<Shared>,
) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let max = shared.opts.max_frame_bytes;
    let heartbeat = shared.opts.heartbeat;
    let mut ticker = heartbeat.ticker();
    let mut last_heard = std::time::Instant::now();
    let mut nonce = 0u64;
    loop {
        let silent_until = tokio::time::Instant::from_std(last_heard + heartbeat.timeout);
        let received = tokio::select! {
            r = transport::recv(stream, max) => r,
            _ = tokio::time::sleep_until(silent_until) => {
                return heartbeat.expired(last_heard).unwrap_or_else(|| "no heartbeat".into());
            }
            _ = ticker.tick() => {
                nonce += 1;
                let _ = outbox.try_send(Outgoing::Msg(Message::Ping { nonce, health: None }));
                continue;
            }
        };
        let msg = match received {
            Err(RecvError::Closed(reason)) => return format!("closed ({reason})"),
            Err(e) => {
                let reason = e.to_string();
                let _ = outbox.try_send(Outgoing::Close(reason.clone()));
                return reason;
            }
            Ok(msg) => msg,
        };
        last_heard = std::time::Instant::now();
        handle(me, msg, outbox, shared).await;
    }
}

async fn handle(me: WorkerId, msg: Message, outbox: &Outbox, shared: &Arc<Shared>) {
    match msg {
        Message::RegisterFunction {
            name, resumable, ..
        } => {
            if builtins::is_builtin(&name) {
                tracing::warn!(function = %name, "a worker may not register a built-in name");
                return;
            }
            tracing::info!(function = %name, "function registered");
            shared.registry().register_function(me, &name, resumable);
        }
        Message::UnregisterFunction { name } => shared.registry().unregister_function(me, &name),
        Message::RegisterTrigger {
            method,
            path,
            function,
            requires,
        } => {
            tracing::info!(%method, %path, %function, ?requires, "trigger registered");
            if let Err(e) = shared
                .state
                .save_trigger(&method, &path, &function, &requires)
            {
                tracing::warn!(error = %e, "cannot remember the trigger");
            }
            shared
                .registry()
                .register_trigger(&method, &path, &function, requires);
        }
        Message::Invoke {
            id,
            function,
            payload,
            timeout_ms,
            trace_id,
            http,
        } => {
            if builtins::is_builtin(&function) {
                let shared = Arc::clone(shared);
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    let outcome = builtins::call(&shared.state, &function, &payload).await;
                    let _ = outbox
                        .send(Outgoing::Msg(Message::Result { id, outcome }))
                        .await;
                });
                return;
            }
            let routed = shared.registry().dispatch(
                &function,
                None,
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
                },
            );
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
        Message::Ping { nonce, health } => {
            let _ = outbox.try_send(Outgoing::Msg(Message::Pong { nonce }));
            if let Some(health) = health {
                shared.worker_health(me, health);
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
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn tokens_compare_exactly_and_empty_refuses_all() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("", ""));
    }
}
