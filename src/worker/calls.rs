//! Calls a worker makes through the gateway ([`Mesh`]): one answer or a stream of them, each
//! cancelled where it runs when its handle is dropped, and failed at once when the connection
//! it went out on is lost. A worker joined to several gateways sends a call through the gateway
//! its invocation came from when that one is still connected, else through any other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::protocol::{ErrorBody, ErrorCode, HttpResponseHead, Message, Outcome, RouteHint};
use crate::transport::{Outbox, Outgoing};

/// An answer to a call this worker made through the gateway.
#[derive(Debug)]
enum Answer {
    Done(Outcome),
    Start(Option<HttpResponseHead>),
    Chunk(Bytes),
    End(Option<ErrorBody>),
}

/// Calls functions through the gateways. Cheap to clone; survives reconnects.
#[derive(Clone, Default)]
pub struct Mesh {
    inner: Arc<MeshInner>,
    /// The connection to send through while it is up (the one the invocation came on).
    prefer: Option<u64>,
}

#[derive(Default)]
struct MeshInner {
    conn: Mutex<Conn>,
    next_id: AtomicU64,
}

/// The connections and the calls waiting on each, under one lock: a call is either registered
/// before a disconnect fails it, or sees no connection at all; none is left waiting forever.
#[derive(Default)]
struct Conn {
    /// Open connections by id, in the order they joined.
    outboxes: Vec<(u64, Outbox)>,
    /// Calls in flight: the connection each went out on, and where its answers go.
    pending: HashMap<u64, (u64, mpsc::Sender<Answer>)>,
    /// Turns among the connections when no preferred one is up.
    turn: usize,
}

impl Conn {
    fn outbox(&self, conn: u64) -> Option<&Outbox> {
        self.outboxes
            .iter()
            .find(|(c, _)| *c == conn)
            .map(|(_, o)| o)
    }
}

/// A call in flight; dropping it cancels the call where it runs.
struct CallGuard {
    id: u64,
    mesh: Mesh,
    answers: mpsc::Receiver<Answer>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.mesh.cancel(self.id);
    }
}

/// A streamed answer from [`Mesh::call_stream`].
pub struct CallStream {
    guard: CallGuard,
    pub http: Option<HttpResponseHead>,
    /// Starts seen after the first (the call moved to another worker before it began).
    restarts: u32,
}

/// More starts than this in one stream is a peer misbehaving, not a call moving between workers.
const MAX_RESTARTS: u32 = 8;

impl CallStream {
    /// The next chunk; `None` at the end; an `Err` ends the stream.
    pub async fn next(&mut self) -> Option<Result<Bytes, ErrorBody>> {
        loop {
            return match self.guard.answers.recv().await {
                Some(Answer::Chunk(b)) => Some(Ok(b)),
                Some(Answer::End(None)) => None,
                Some(Answer::End(Some(e))) | Some(Answer::Done(Outcome::Error(e))) => Some(Err(e)),
                // Another start: the gateway moved the call to another worker before it began.
                Some(Answer::Start(_)) if self.restarts < MAX_RESTARTS => {
                    self.restarts += 1;
                    continue;
                }
                Some(Answer::Start(_)) => Some(Err(ErrorBody::new(
                    ErrorCode::WorkerLost,
                    format!("the stream started more than {} times", MAX_RESTARTS + 1),
                ))),
                Some(other) => Some(Err(unexpected(&other))),
                None => Some(Err(lost())),
            };
        }
    }
}

fn lost() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::WorkerLost,
        "the connection to the gateway was lost",
    )
}

fn unexpected(a: &Answer) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("unexpected answer: {a:?}"))
}

impl Mesh {
    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The same calls, sent through connection `conn` while it is up.
    pub(super) fn via(&self, conn: u64) -> Mesh {
        Mesh {
            inner: Arc::clone(&self.inner),
            prefer: Some(conn),
        }
    }

    pub(super) fn connected(&self, id: u64, outbox: Outbox) {
        self.conn().outboxes.push((id, outbox));
    }

    /// Fails every call in flight on connection `id`: their answers can no longer arrive.
    pub(super) fn disconnected(&self, id: u64) {
        let mut conn = self.conn();
        conn.outboxes.retain(|(c, _)| *c != id);
        let lost_calls: Vec<u64> = conn
            .pending
            .iter()
            .filter(|(_, (c, _))| *c == id)
            .map(|(call, _)| *call)
            .collect();
        for call in lost_calls {
            if let Some((_, tx)) = conn.pending.remove(&call) {
                let _ = tx.try_send(Answer::Done(Outcome::Error(lost())));
            }
        }
    }

    /// Stops call `id` where it runs, unless it has already ended.
    fn cancel(&self, id: u64) {
        let mut conn = self.conn();
        if let Some((via, _)) = conn.pending.remove(&id) {
            if let Some(outbox) = conn.outbox(via) {
                let _ = outbox.try_send(Outgoing::Msg(Message::Cancel { id }));
            }
        }
    }

    pub(super) fn answer(&self, msg: Message) {
        let (id, answer, last) = match msg {
            Message::Result { id, outcome } => (id, Answer::Done(outcome), true),
            Message::StreamStart { id, http } => (id, Answer::Start(http), false),
            Message::StreamChunk { id, data } => {
                (id, Answer::Chunk(Bytes::from(data.into_vec())), false)
            }
            Message::StreamEnd { id, error } => (id, Answer::End(error), true),
            _ => return,
        };
        let tx = {
            let mut conn = self.conn();
            if last {
                conn.pending.remove(&id).map(|(_, tx)| tx)
            } else {
                conn.pending.get(&id).map(|(_, tx)| tx.clone())
            }
        };
        if let Some(tx) = tx {
            if tx.try_send(answer).is_err() && !last {
                // The caller is not reading fast enough (or left): stop the call.
                self.cancel(id);
            }
        }
    }

    fn send(
        &self,
        function: &str,
        payload: Vec<u8>,
        trace_id: &str,
        route: Option<RouteHint>,
        timeout: Duration,
    ) -> Result<CallGuard, ErrorBody> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(512);
        let msg = Message::Invoke {
            id,
            function: function.to_string(),
            payload: serde_bytes::ByteBuf::from(payload),
            timeout_ms: timeout.as_millis() as u64,
            trace_id: trace_id.to_string(),
            http: None,
            // Made inside the invocation's span: the callee's span becomes its child.
            traceparent: crate::telemetry::inject(&tracing::Span::current()),
            route: route.map(Box::new),
        };
        let mut conn = self.conn();
        let via = match self.prefer.filter(|p| conn.outbox(*p).is_some()) {
            Some(p) => p,
            None if conn.outboxes.is_empty() => {
                return Err(ErrorBody::new(
                    ErrorCode::NoWorker,
                    "this worker is not connected to any gateway",
                ))
            }
            None => {
                conn.turn = conn.turn.wrapping_add(1);
                conn.outboxes[conn.turn % conn.outboxes.len()].0
            }
        };
        let outbox = conn.outbox(via).expect("chosen among the open connections");
        outbox.try_send(Outgoing::Msg(msg)).map_err(|_| {
            ErrorBody::new(
                ErrorCode::Overloaded,
                "the connection to the gateway is saturated",
            )
        })?;
        conn.pending.insert(id, (via, tx));
        Ok(CallGuard {
            id,
            mesh: self.clone(),
            answers: rx,
        })
    }

    /// Sends a call and waits, at most until `deadline`, for its first answer; an error answer,
    /// a lost connection and a passed deadline (`\`function\` did not {what} in time`) are errors.
    async fn first_answer(
        &self,
        function: &str,
        payload: Vec<u8>,
        trace_id: &str,
        deadline: Instant,
        what: &str,
        route: Option<RouteHint>,
    ) -> Result<(CallGuard, Answer), ErrorBody> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let mut guard = self.send(function, payload, trace_id, route, timeout)?;
        match tokio::time::timeout_at(deadline, guard.answers.recv()).await {
            Err(_) => Err(ErrorBody::new(
                ErrorCode::DeadlineExceeded,
                format!("`{function}` did not {what} in time"),
            )),
            Ok(None) => Err(lost()),
            Ok(Some(Answer::Done(Outcome::Error(e)))) => Err(e),
            Ok(Some(answer)) => Ok((guard, answer)),
        }
    }

    /// Calls `function` and waits for its one answer, at most until `deadline`.
    pub async fn call(
        &self,
        function: &str,
        payload: Vec<u8>,
        trace_id: &str,
        deadline: Instant,
    ) -> Result<Bytes, ErrorBody> {
        self.call_routed(function, None, payload, trace_id, deadline)
            .await
    }

    /// [`Mesh::call`] with a hint of where it should run (a model, an affinity key).
    pub async fn call_routed(
        &self,
        function: &str,
        route: Option<RouteHint>,
        payload: Vec<u8>,
        trace_id: &str,
        deadline: Instant,
    ) -> Result<Bytes, ErrorBody> {
        let (_guard, answer) = self
            .first_answer(function, payload, trace_id, deadline, "answer", route)
            .await?;
        match answer {
            Answer::Done(Outcome::Ok { payload, .. }) => Ok(Bytes::from(payload.into_vec())),
            other => Err(unexpected(&other)),
        }
    }

    /// Calls a streaming function; answers once its stream has started (or it failed).
    pub async fn call_stream(
        &self,
        function: &str,
        payload: Vec<u8>,
        trace_id: &str,
        deadline: Instant,
    ) -> Result<CallStream, ErrorBody> {
        self.call_stream_routed(function, None, payload, trace_id, deadline)
            .await
    }

    /// [`Mesh::call_stream`] with a hint of where it should run (a model, an affinity key).
    pub async fn call_stream_routed(
        &self,
        function: &str,
        route: Option<RouteHint>,
        payload: Vec<u8>,
        trace_id: &str,
        deadline: Instant,
    ) -> Result<CallStream, ErrorBody> {
        let (guard, answer) = self
            .first_answer(function, payload, trace_id, deadline, "start", route)
            .await?;
        match answer {
            Answer::Start(http) => Ok(CallStream {
                guard,
                http,
                restarts: 0,
            }),
            other => Err(unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(answers: mpsc::Receiver<Answer>) -> CallStream {
        CallStream {
            guard: CallGuard {
                id: 1,
                mesh: Mesh::default(),
                answers,
            },
            http: None,
            restarts: 0,
        }
    }

    #[tokio::test]
    async fn a_moved_call_restarts_but_endless_starts_end_the_stream_without_recursion() {
        let (tx, rx) = mpsc::channel(64);
        let mut s = stream(rx);
        for answer in [
            Answer::Start(None),
            Answer::Start(None),
            Answer::Chunk(Bytes::from_static(b"x")),
            Answer::End(None),
        ] {
            tx.send(answer).await.unwrap();
        }
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"x"));
        assert!(s.next().await.is_none());

        let (tx, rx) = mpsc::channel(64);
        let mut s = stream(rx);
        for _ in 0..50 {
            tx.send(Answer::Start(None)).await.unwrap();
        }
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code, "worker_lost");
        assert!(err.message.contains("started more than 9 times"), "{err}");
    }
}
