//! The worker side of the mesh, shared by every role that connects out to a gateway: connect with
//! jittered backoff, authenticate, register functions and triggers (again after every reconnect),
//! run invocations concurrently, and call other functions through the gateway ([`Mesh`]).
//!
//! A worker joins every gateway it is given, each on a link of its own: it registers on each,
//! answers each gateway's invocations on that gateway's connection, and reports on every link the
//! work it holds for the others, so each gateway routes by the worker's true load. A gateway URL
//! whose host is a DNS name is resolved again every few seconds, with one link per address: a
//! fleet of gateways behind one name is joined whole, and follows the name as it changes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::liveness::{notify, Beacon, Health, Heartbeat, ProgressProbe, StallWatch};
use crate::protocol::{
    ErrorBody, ErrorCode, HttpRequestHead, HttpResponseHead, Message, Outcome, PROTOCOL_VERSION,
};
use crate::transport::{self, Outbox, Outgoing, RecvError};

mod calls;
pub use calls::{CallStream, Mesh};

type WsStream = tokio_tungstenite::WebSocketStream<crate::tls::BoxIo>;
type WsReader = futures_util::stream::SplitStream<WsStream>;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub type Handler = Arc<dyn Fn(Call) -> BoxFuture<Result<Response, ErrorBody>> + Send + Sync>;

/// One invocation as a function sees it.
pub struct Call {
    pub payload: Bytes,
    pub http: Option<HttpRequestHead>,
    pub trace_id: String,
    /// The W3C `traceparent` the invocation came with (OpenTelemetry export on).
    pub traceparent: Option<String>,
    pub deadline: Instant,
    /// Calls other functions through the gateway.
    pub mesh: Mesh,
    /// For a resumable function: tells the gateway the work has really begun.
    pub started: Started,
}

/// Marks a resumable invocation as begun (once); a no-op for other functions.
#[derive(Clone, Default)]
pub struct Started {
    target: Option<(Outbox, u64)>,
    sent: Arc<std::sync::atomic::AtomicBool>,
}

impl Started {
    pub fn mark(&self) {
        if let Some((outbox, id)) = &self.target {
            if !self.sent.swap(true, Ordering::Relaxed) {
                let _ = outbox.try_send(Outgoing::Msg(Message::Started { id: *id }));
            }
        }
    }
}

/// What a function answers.
pub enum Response {
    Full {
        payload: Vec<u8>,
        http: Option<HttpResponseHead>,
    },
    /// Chunks are forwarded as they come; an `Err` ends the stream with that error.
    Stream {
        http: Option<HttpResponseHead>,
        chunks: mpsc::Receiver<Result<Bytes, ErrorBody>>,
    },
}

impl Response {
    pub fn payload(payload: Vec<u8>) -> Self {
        Response::Full {
            payload,
            http: None,
        }
    }
}

struct Trigger {
    method: String,
    path: String,
    function: String,
    requires: Vec<String>,
}

/// How a worker connects.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub name: String,
    /// Every gateway to join: `ws://` or `wss://` URLs; a DNS name joins each of its addresses.
    pub gateway_urls: Vec<String>,
    pub token: String,
    pub max_frame_bytes: usize,
    pub max_concurrency: usize,
    pub drain_timeout: Duration,
    /// How often the worker pings the gateway, and how long a silent gateway is given.
    pub heartbeat: Heartbeat,
    /// Trust for a `wss://` gateway (its CA); `None` for `ws://`.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// A worker: its functions and triggers, and the loop that keeps it connected.
pub struct Worker {
    opts: WorkerOptions,
    /// Name, handler, and whether it is resumable (reports `Started` itself).
    functions: Vec<(String, Handler, bool)>,
    triggers: Vec<Trigger>,
    mesh: Mesh,
    /// Beaten by the connection loop; read by the systemd watchdog.
    beacon: Arc<Beacon>,
    /// An engine's progress, reported with every heartbeat (infer).
    progress: Option<(ProgressProbe, Mutex<StallWatch>)>,
    /// The models this worker serves, announced with its functions (infer).
    models: Vec<String>,
    /// The links that have joined a gateway: where each goes, and the invocations it runs.
    links: Mutex<BTreeMap<u64, (String, Running)>>,
    next_link: AtomicU64,
}

/// Longest a connection attempt (TCP, TLS, WebSocket, hello → welcome) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a gateway URL's host name is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// Most addresses one gateway URL joins (a DNS answer is outside input).
const MAX_ADDRESSES: usize = 16;

impl Worker {
    pub fn new(opts: WorkerOptions) -> Self {
        Worker {
            opts,
            functions: Vec::new(),
            triggers: Vec::new(),
            mesh: Mesh::default(),
            beacon: Arc::new(Beacon::default()),
            progress: None,
            models: Vec::new(),
            links: Mutex::new(BTreeMap::new()),
            next_link: AtomicU64::new(0),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (String, Running)>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Invocations running on every link.
    fn active(&self) -> usize {
        self.links().values().map(|(_, r)| r.len()).sum()
    }

    /// Where the joined links go, for the gateways' status.
    fn joined(&self) -> Vec<String> {
        let mut at: Vec<String> = self.links().values().map(|(at, _)| at.clone()).collect();
        at.sort();
        at
    }

    /// Announces that this worker serves `model`: invocations naming another model never come here.
    pub fn serving(mut self, model: &str) -> Self {
        self.models.push(model.to_string());
        self
    }

    /// Reports an engine's progress with every heartbeat; busy without a step for `stall_limit`
    /// is a stall: the gateway stops routing here and the watchdog is no longer fed.
    pub fn progress(mut self, probe: ProgressProbe, stall_limit: Duration) -> Self {
        self.progress = Some((probe, Mutex::new(StallWatch::new(stall_limit))));
        self
    }

    /// What the systemd watchdog reads: the connection loop's beat and the engine's stall.
    pub fn beacon(&self) -> Arc<Beacon> {
        Arc::clone(&self.beacon)
    }

    /// Beats the beacon and takes one reading of the engine, if any, as link `link` reports it:
    /// the work it holds for other gateways counts as backlog, so each gateway sees it.
    fn health(&self, link: Option<u64>) -> Option<Health> {
        self.beacon.beat();
        let (probe, watch) = self.progress.as_ref()?;
        let others = link.map_or(0, |link| {
            let links = self.links();
            let mine = links.get(&link).map_or(0, |(_, r)| r.len());
            links.values().map(|(_, r)| r.len()).sum::<usize>() - mine
        });
        let mut watch = watch.lock().unwrap_or_else(|e| e.into_inner());
        let mut health = watch.observe(probe(), std::time::Instant::now());
        health.backlog = health.backlog.saturating_add(others as u64);
        if self.beacon.set_stalled(health.stalled) != health.stalled {
            if health.stalled {
                let secs = watch.limit().as_secs();
                tracing::error!(worker = %self.opts.name, steps = health.steps, "engine stalled: no decode step for {secs} s while holding work");
                notify(&format!(
                    "STATUS=engine stalled: no decode step for {secs} s while holding work"
                ));
            } else {
                tracing::info!(worker = %self.opts.name, steps = health.steps, "engine progressing again");
                notify(&format!(
                    "STATUS=engine progressing again; serving {}",
                    self.opts.gateway_urls.join(", ")
                ));
            }
        }
        Some(health)
    }

    pub fn function<F, Fut>(self, name: &str, f: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, ErrorBody>> + Send + 'static,
    {
        self.add(name, f, false)
    }

    /// A function that calls `call.started.mark()` when its work really begins (e.g. a queued
    /// generation getting a slot): until then, the gateway may move it to another worker if
    /// this one disconnects.
    pub fn resumable_function<F, Fut>(self, name: &str, f: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, ErrorBody>> + Send + 'static,
    {
        self.add(name, f, true)
    }

    fn add<F, Fut>(mut self, name: &str, f: F, resumable: bool) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, ErrorBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |call| Box::pin(f(call)));
        self.functions.push((name.to_string(), handler, resumable));
        self
    }

    /// Maps `method path` on the gateway to `function`, which calls the functions in `requires`.
    pub fn trigger(mut self, method: &str, path: &str, function: &str, requires: &[&str]) -> Self {
        self.triggers.push(Trigger {
            method: method.to_string(),
            path: path.to_string(),
            function: function.to_string(),
            requires: requires.iter().map(|r| r.to_string()).collect(),
        });
        self
    }

    /// The (method, path) of every trigger it registers.
    pub fn triggers(&self) -> Vec<(String, String)> {
        self.triggers
            .iter()
            .map(|t| (t.method.clone(), t.path.clone()))
            .collect()
    }

    /// A handle for calls made outside any invocation.
    pub fn mesh(&self) -> Mesh {
        self.mesh.clone()
    }

    /// Stays connected (reconnecting with backoff) until `shutdown`, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let body = Arc::new(self).run_until(stop.clone());
        tokio::pin!(body);
        tokio::select! {
            _ = &mut body => {}
            _ = shutdown => {
                stop.cancel();
                body.await;
            }
        }
    }

    async fn run_until(self: Arc<Self>, stop: CancellationToken) {
        let follows: Vec<_> = self
            .opts
            .gateway_urls
            .iter()
            .map(|url| tokio::spawn(Arc::clone(&self).follow(url.clone(), stop.clone())))
            .collect();
        for f in follows {
            let _ = f.await;
        }
    }

    /// Keeps a link to every address `url`'s host resolves to, resolving it again every
    /// [`RESOLVE_EVERY`]: a new address is joined, one gone from the answer is drained and left.
    async fn follow(self: Arc<Self>, url: String, stop: CancellationToken) {
        let mut links: HashMap<SocketAddr, (CancellationToken, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        let mut retired = Vec::new();
        let mut wait = Duration::from_millis(100);
        loop {
            match resolve(&url).await {
                Ok(addrs) => {
                    wait = RESOLVE_EVERY;
                    let gone: Vec<SocketAddr> = links
                        .keys()
                        .filter(|a| !addrs.contains(a))
                        .copied()
                        .collect();
                    for addr in gone {
                        tracing::info!(worker = %self.opts.name, %url, %addr, "the gateway address is gone from the name; leaving it");
                        let (token, handle) = links.remove(&addr).expect("listed");
                        token.cancel();
                        retired.push(handle);
                    }
                    for addr in addrs {
                        links.entry(addr).or_insert_with(|| {
                            let token = stop.child_token();
                            let link = Arc::clone(&self).link(url.clone(), addr, token.clone());
                            (token, tokio::spawn(link))
                        });
                    }
                }
                // Addresses already joined stay joined; with none yet, try again soon.
                Err(why) => {
                    tracing::warn!(worker = %self.opts.name, %url, reason = %why, "cannot resolve the gateway");
                    notify(&format!("STATUS=cannot resolve {url}: {why}"));
                    if links.is_empty() {
                        wait = (wait * 2).min(RESOLVE_EVERY);
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        for (_, (_, handle)) in links {
            let _ = handle.await;
        }
        for handle in retired {
            let _ = handle.await;
        }
    }

    /// One gateway address: stays joined (reconnecting with backoff) until `stop`.
    async fn link(self: Arc<Self>, url: String, addr: SocketAddr, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            self.health(None);
            let session = self.session(&url, addr, &stop).await;
            self.health(None);
            match session {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Lost(why)) => {
                    tracing::warn!(worker = %self.opts.name, %addr, reason = %why, "lost the gateway; reconnecting");
                    notify(&format!(
                        "STATUS=lost the gateway {addr} ({why}); reconnecting"
                    ));
                    backoff = Duration::from_millis(100);
                }
                // Refused after joining (a registration outside this token's grant): a
                // configuration error that a quick retry will not fix, so the backoff grows.
                Ok(SessionEnd::Refused(why)) => {
                    tracing::error!(worker = %self.opts.name, %addr, reason = %why, retry_in = ?backoff, "refused by the gateway");
                    notify(&format!("STATUS=refused by the gateway: {why}"));
                }
                Err(why) => {
                    tracing::warn!(worker = %self.opts.name, %addr, reason = %why, retry_in = ?backoff, "cannot join the mesh");
                    notify(&format!("STATUS=cannot join the mesh: {why}"));
                }
            }
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection, from handshake to loss or shutdown.
    async fn session(
        self: &Arc<Self>,
        url: &str,
        addr: SocketAddr,
        stop: &CancellationToken,
    ) -> Result<SessionEnd, String> {
        let (mut stream, outbox, writer) = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(SessionEnd::Shutdown),
            joined = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(url, addr)) => {
                joined.map_err(|_| format!("no welcome from {url} ({addr}) within {} s", HANDSHAKE_TIMEOUT.as_secs()))??
            }
        };
        let send = |m: Message| {
            let outbox = outbox.clone();
            async move {
                outbox
                    .send(Outgoing::Msg(m))
                    .await
                    .map_err(|_| "connection closed".to_string())
            }
        };
        for (name, _, resumable) in &self.functions {
            send(Message::RegisterFunction {
                name: name.clone(),
                description: None,
                resumable: *resumable,
                models: self.models.clone(),
            })
            .await?;
        }
        for t in &self.triggers {
            send(Message::RegisterTrigger {
                method: t.method.clone(),
                path: t.path.clone(),
                function: t.function.clone(),
                requires: t.requires.clone(),
            })
            .await?;
        }
        let link = self.next_link.fetch_add(1, Ordering::Relaxed);
        let running = Running::default();
        self.links()
            .insert(link, (addr.to_string(), running.clone()));
        self.mesh.connected(link, outbox.clone());
        // Registered: tell systemd (again after a reconnect, which it ignores).
        notify(&format!(
            "READY=1\nSTATUS=joined {url} ({addr}) as {}; serving {} functions",
            self.opts.name,
            self.functions.len()
        ));
        self.beacon.set_ready();
        let end = self.serve(link, &mut stream, &outbox, &running, stop).await;
        self.mesh.disconnected(link);
        self.links().remove(&link);
        running.abort_all();
        if matches!(end, SessionEnd::Shutdown) {
            // The close is queued behind the last answers: let the writer put them all on the
            // socket before the process exits.
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
        Ok(end)
    }

    /// Connects to one address of `url`, says hello, and waits for the welcome.
    async fn handshake(
        &self,
        url: &str,
        addr: SocketAddr,
    ) -> Result<(WsReader, Outbox, tokio::task::JoinHandle<()>), String> {
        let config = transport::ws_config(self.opts.max_frame_bytes);
        let (secure, host, _) = crate::tls::endpoint(url, "wss")?;
        let tls = if secure {
            Some(self.opts.tls.as_ref().ok_or("wss:// needs gateway_ca")?)
        } else {
            None
        };
        let io = crate::tls::connect_addr(addr, &host, tls)
            .await
            .map_err(|e| format!("cannot connect to {url} ({addr}): {e}"))?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, io, Some(config))
            .await
            .map_err(|e| format!("websocket handshake with {url} failed: {e}"))?;
        let (sink, mut stream) = ws.split();
        let (outbox, writer) = transport::spawn_writer(sink);
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            name: self.opts.name.clone(),
            token: self.opts.token.clone(),
        };
        outbox
            .send(Outgoing::Msg(hello))
            .await
            .map_err(|_| "connection closed".to_string())?;
        let max = self.opts.max_frame_bytes;
        match transport::recv(&mut stream, max).await {
            Ok(Message::Welcome { worker_id }) => {
                tracing::info!(worker = %self.opts.name, %worker_id, %url, %addr, "joined the mesh");
                Ok((stream, outbox, writer))
            }
            Ok(Message::Refused { reason }) => Err(format!("refused by the gateway: {reason}")),
            Ok(other) => Err(format!("unexpected answer to hello: {other:?}")),
            Err(e) => Err(format!("handshake failed: {e}")),
        }
    }

    async fn serve<S>(
        self: &Arc<Self>,
        link: u64,
        stream: &mut futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<S>>,
        outbox: &Outbox,
        running: &Running,
        stop: &CancellationToken,
    ) -> SessionEnd
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let max = self.opts.max_frame_bytes;
        let heartbeat = self.opts.heartbeat;
        let mut ticker = heartbeat.ticker();
        let mut last_heard = std::time::Instant::now();
        let mut nonce = 0u64;
        // Draining: the deadline, and whether the gateway has confirmed it routes nothing more
        // here. Until it has, invokes already on their way are read and run as usual.
        let mut draining: Option<Instant> = None;
        let mut confirmed = false;
        loop {
            if let Some(deadline) = draining {
                let done = confirmed && running.len() == 0;
                if done || Instant::now() >= deadline {
                    if !done {
                        tracing::warn!(worker = %self.opts.name, inflight = running.len(), "drain deadline passed");
                    }
                    let _ = outbox
                        .send(Outgoing::Close("worker shutting down".into()))
                        .await;
                    return SessionEnd::Shutdown;
                }
            }
            let deadline = draining.unwrap_or_else(Instant::now);
            let received = tokio::select! {
                biased;
                _ = stop.cancelled(), if draining.is_none() => {
                    let _ = outbox.send(Outgoing::Msg(Message::Draining {})).await;
                    tracing::info!(worker = %self.opts.name, inflight = running.len(), "draining");
                    draining = Some(Instant::now() + self.opts.drain_timeout);
                    continue;
                }
                _ = running.idle(), if confirmed => continue,
                _ = tokio::time::sleep_until(deadline), if draining.is_some() => continue,
                _ = tokio::time::sleep_until(heartbeat.deadline(last_heard)) => {
                    let why = heartbeat.silence(last_heard);
                    return SessionEnd::Lost(format!("the gateway went silent: {why}"));
                }
                _ = ticker.tick() => {
                    nonce += 1;
                    let health = self.health(Some(link));
                    let gateways = self.joined();
                    let _ = outbox.try_send(Outgoing::Msg(Message::Ping { nonce, health, gateways }));
                    continue;
                }
                r = transport::recv(stream, max) => r,
            };
            let msg = match received {
                Err(RecvError::Closed(r)) => return SessionEnd::Lost(format!("closed ({r})")),
                Err(e) => return SessionEnd::Lost(e.to_string()),
                Ok(m) => m,
            };
            last_heard = std::time::Instant::now();
            match msg {
                Message::Invoke {
                    id,
                    function,
                    payload,
                    timeout_ms,
                    trace_id,
                    http,
                    traceparent,
                    ..
                } => {
                    let call = Call {
                        traceparent,
                        payload: Bytes::from(payload.into_vec()),
                        http,
                        trace_id,
                        deadline: Instant::now() + Duration::from_millis(timeout_ms),
                        mesh: self.mesh.via(link),
                        started: Started::default(),
                    };
                    self.start(id, &function, call, outbox, running);
                }
                Message::Cancel { id } => running.abort(id),
                // A registration outside this worker's grant: the gateway closes the connection.
                Message::Refused { reason } => return SessionEnd::Refused(reason),
                // The gateway's answer to our `Draining`: nothing more will be routed here.
                Message::Draining {} => confirmed = true,
                Message::Ping { nonce, .. } => {
                    let _ = outbox.try_send(Outgoing::Msg(Message::Pong { nonce }));
                }
                Message::Result { .. }
                | Message::StreamStart { .. }
                | Message::StreamChunk { .. }
                | Message::StreamEnd { .. } => self.mesh.answer(msg),
                _ => {}
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        id: u64,
        function: &str,
        mut call: Call,
        outbox: &Outbox,
        running: &Running,
    ) {
        let found = self.functions.iter().find(|(n, _, _)| n == function);
        let handler = found.map(|(_, h, _)| Arc::clone(h));
        if found.is_some_and(|(_, _, resumable)| *resumable) {
            call.started.target = Some((outbox.clone(), id));
        }
        let refuse = |err: ErrorBody| {
            let _ = outbox.try_send(Outgoing::Msg(Message::Result {
                id,
                outcome: Outcome::Error(err),
            }));
        };
        let Some(handler) = handler else {
            return refuse(ErrorBody::new(
                ErrorCode::NotFound,
                format!("`{function}` is not served by worker {}", self.opts.name),
            ));
        };
        if self.active() >= self.opts.max_concurrency {
            return refuse(ErrorBody::new(
                ErrorCode::Overloaded,
                format!(
                    "worker {} is running its limit of {} invocations",
                    self.opts.name, self.opts.max_concurrency
                ),
            ));
        }
        let sampled = crate::telemetry::sampled_child(call.traceparent.as_deref());
        let span = crate::span!(sampled, "invoke", %function, trace_id = %call.trace_id);
        crate::telemetry::extract(&span, call.traceparent.as_deref());
        let outbox = outbox.clone();
        let running2 = running.clone();
        let deadline = call.deadline;
        let task = tokio::spawn(
            async move {
                let result = tokio::time::timeout_at(deadline, handler(call)).await;
                let result = result.unwrap_or_else(|_| {
                    Err(ErrorBody::new(
                        ErrorCode::DeadlineExceeded,
                        "the deadline passed",
                    ))
                });
                answer(id, result, &outbox).await;
                running2.remove(id);
            }
            .instrument(span),
        );
        running.insert(id, task.abort_handle());
    }
}

/// The addresses a gateway URL's host names now: those of the first answer's family (so
/// `localhost` is one gateway, not two), deduplicated, at most [`MAX_ADDRESSES`].
async fn resolve(url: &str) -> Result<Vec<SocketAddr>, String> {
    let (_, host, port) = crate::tls::endpoint(url, "wss")?;
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let first = found
        .first()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    let v4 = first.is_ipv4();
    let mut addrs: Vec<SocketAddr> = found.into_iter().filter(|a| a.is_ipv4() == v4).collect();
    addrs.sort();
    addrs.dedup();
    addrs.truncate(MAX_ADDRESSES);
    Ok(addrs)
}

/// Sends a function's answer, streaming it when it streams.
async fn answer(id: u64, result: Result<Response, ErrorBody>, outbox: &Outbox) {
    let send = |m| outbox.send(Outgoing::Msg(m));
    match result {
        Err(e) => {
            let _ = send(Message::Result {
                id,
                outcome: Outcome::Error(e),
            })
            .await;
        }
        Ok(Response::Full { payload, http }) => {
            let outcome = Outcome::Ok {
                payload: serde_bytes::ByteBuf::from(payload),
                http,
            };
            let _ = send(Message::Result { id, outcome }).await;
        }
        Ok(Response::Stream { http, mut chunks }) => {
            if send(Message::StreamStart { id, http }).await.is_err() {
                return;
            }
            let mut error = None;
            while let Some(item) = chunks.recv().await {
                match item {
                    Ok(data) => {
                        let data = serde_bytes::ByteBuf::from(Vec::from(data));
                        if send(Message::StreamChunk { id, data }).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            let _ = send(Message::StreamEnd { id, error }).await;
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    /// The gateway refused something this worker registered, and closed the connection.
    Refused(String),
}

/// Invocations running on this worker, by the gateway's id.
#[derive(Clone, Default)]
struct Running {
    tasks: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    emptied: Arc<Notify>,
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn len(&self) -> usize {
        self.lock().len()
    }
    fn insert(&self, id: u64, h: AbortHandle) {
        self.lock().insert(id, h);
    }
    fn remove(&self, id: u64) {
        let mut t = self.lock();
        t.remove(&id);
        if t.is_empty() {
            self.emptied.notify_waiters();
        }
    }
    /// Cancels one invocation: its future is dropped, and with it every call it made.
    fn abort(&self, id: u64) {
        if let Some(h) = self.lock().remove(&id) {
            h.abort();
        }
    }
    fn abort_all(&self) {
        for (_, h) in self.lock().drain() {
            h.abort();
        }
    }
    async fn idle(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.len() == 0 {
                return;
            }
            notified.await;
        }
    }
}
