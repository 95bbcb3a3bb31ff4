//! The gateway: public HTTP API, private worker mesh, routing, and the state built-in.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind port 0 and never
//! sleep. The parts: [`registry`] (who serves what), [`mesh`] (worker connections), [`http`]
//! (the HTTP front), [`builtins`] (`state::*`), [`crate::metrics`].

pub mod budget;
pub mod builtins;
pub mod grants;
pub mod http;
mod limits;
pub mod mesh;
pub mod probe;
pub mod registry;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::protocol::{ErrorBody, ErrorCode, HttpRequestHead, Message, Outcome};
use crate::state::StateStore;
use crate::transport::Outgoing;
use registry::{Pick, Registry, Reply, Sink};

/// Limits and secrets the gateway enforces, taken from [`Settings`].
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// The worker tokens it accepts, each with its role's grant.
    pub identities: grants::Identities,
    /// The API keys and certificates read at start ([`Shared::secrets`] has the ones in force).
    pub secrets: Secrets,
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// An HTTP connection's deadline for a complete request head, and a body's after its head.
    pub http_header_timeout: Duration,
    pub http_body_timeout: Duration,
    /// How long a trigger outlives the last worker of its function.
    pub trigger_grace: Duration,
    pub queue_depth: usize,
    /// See `Settings::affinity_slack`.
    pub affinity_slack: usize,
    /// The HTTP listener's connection budget: in total, and per peer address (0: no cap).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// The mesh listener's, apart from the HTTP one's.
    pub max_mesh_connections: usize,
    pub max_mesh_connections_per_ip: usize,
    pub drain_timeout: Duration,
    /// How often the gateway pings each worker, and how long a silent one is given.
    pub heartbeat: crate::liveness::Heartbeat,
    /// Triggers (method, path) that must be registered before `/readyz` says ready: `meshd up`
    /// knows its workers' routes; a lone gateway cannot know what will come and expects none.
    pub expected_triggers: Vec<(String, String)>,
    /// Where the API keys and certificates were read from: `SIGHUP` reads them again.
    pub settings: Option<Settings>,
}

/// What `SIGHUP` replaces without a restart: the API keys and the certificates. Connections
/// already open keep what they were accepted with; every new one gets the new set.
#[derive(Clone, Debug)]
pub struct Secrets {
    /// The accepted API keys (digests and limits); empty means the API is open.
    pub api_keys: Arc<Vec<crate::config::ApiKey>>,
    /// HTTPS on the API listener.
    pub http_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// wss:// on the mesh listener.
    pub mesh_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl GatewayOptions {
    /// The options of a gateway; refuses an open API on a non-loopback address unless the
    /// settings say `insecure_no_auth`.
    pub fn from_settings(
        s: &Settings,
        identities: grants::Identities,
    ) -> Result<Self, crate::config::ConfigError> {
        let api_keys = s.api_keys()?;
        if api_keys.is_empty() {
            let addr = crate::config::resolve_addr(&s.http_addr)
                .map_err(crate::config::ConfigError::Invalid)?;
            if !addr.ip().is_loopback() && !s.insecure_no_auth {
                return Err(crate::config::ConfigError::Invalid(format!(
                    "refusing to serve the API on {addr} without API keys: set api_keys_file (or api_keys), \
                     bind to loopback, or set insecure_no_auth = true"
                )));
            }
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the API is open to anyone who can reach it (insecure_no_auth)");
            }
        }
        let tls =
            |cert: &Option<std::path::PathBuf>, key: &Option<std::path::PathBuf>| match (cert, key)
            {
                (Some(c), Some(k)) => crate::tls::server_config(c, k)
                    .map(Some)
                    .map_err(|e| crate::config::ConfigError::Invalid(e.to_string())),
                _ => Ok(None),
            };
        Ok(GatewayOptions {
            identities,
            secrets: Secrets {
                api_keys: Arc::new(api_keys),
                http_tls: tls(&s.tls_cert, &s.tls_key)?,
                mesh_tls: tls(&s.mesh_tls_cert, &s.mesh_tls_key)?,
            },
            max_frame_bytes: s.max_frame_bytes,
            max_body_bytes: s.max_body_bytes,
            request_timeout: Duration::from_secs(s.request_timeout_secs),
            http_header_timeout: Duration::from_secs(s.http_header_timeout_secs),
            http_body_timeout: Duration::from_secs(s.http_body_timeout_secs),
            trigger_grace: Duration::from_secs(s.trigger_grace_secs),
            queue_depth: s.queue_depth,
            affinity_slack: s.affinity_slack,
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            max_mesh_connections: s.max_mesh_connections,
            max_mesh_connections_per_ip: s.max_mesh_connections_per_ip,
            drain_timeout: Duration::from_secs(s.drain_timeout_secs),
            heartbeat: s.heartbeat(),
            expected_triggers: Vec::new(),
            settings: Some(s.clone()),
        })
    }
}

/// State shared by every task of the gateway.
pub struct Shared {
    pub opts: GatewayOptions,
    secrets: RwLock<Secrets>,
    pub state: StateStore,
    pub metrics: Metrics,
    registry: Mutex<Registry>,
    /// Connection budgets of the HTTP and the mesh listener.
    pub http_budget: Arc<budget::Budget>,
    pub mesh_budget: Arc<budget::Budget>,
    /// Cancelled when the gateway starts shutting down.
    pub closing: CancellationToken,
}

impl Shared {
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The API keys and certificates in force now.
    pub fn secrets(&self) -> Secrets {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the API keys and certificates again (on `SIGHUP`). Anything wrong — a missing file,
    /// a key that does not match its certificate, an empty key list where there were keys — keeps
    /// the current set and says why; a listener that started without TLS stays without it.
    pub fn reload_secrets(&self) {
        let Some(settings) = &self.opts.settings else {
            return;
        };
        let fresh = GatewayOptions::from_settings(settings, self.opts.identities.clone())
            .map_err(|e| e.to_string())
            .and_then(|fresh| {
                if fresh.secrets.api_keys.is_empty() && !self.secrets().api_keys.is_empty() {
                    return Err("the new key list is empty, which would open the API".to_string());
                }
                Ok(fresh)
            });
        match fresh {
            Ok(GatewayOptions { secrets: fresh, .. }) => {
                let mut secrets = self.secrets.write().unwrap_or_else(|e| e.into_inner());
                let keep_tls = |now: &Option<_>, new: Option<_>| now.as_ref().and(new);
                *secrets = Secrets {
                    api_keys: fresh.api_keys,
                    http_tls: keep_tls(&secrets.http_tls, fresh.http_tls),
                    mesh_tls: keep_tls(&secrets.mesh_tls, fresh.mesh_tls),
                };
                tracing::info!(
                    api_keys = secrets.api_keys.len(),
                    "reloaded the API keys and certificates"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; keeping the current API keys and certificates")
            }
        }
    }

    /// Invokes `function` for the gateway itself (the HTTP front, metrics), on the least-loaded
    /// worker or on `worker`. Built-ins are not reachable this way.
    pub fn invoke_local(
        self: &Arc<Self>,
        function: &str,
        worker: Option<registry::WorkerId>,
        payload: Bytes,
        http: Option<HttpRequestHead>,
        trace_id: &str,
    ) -> Result<LocalCall, ErrorBody> {
        let (tx, rx) = mpsc::channel(256);
        let timeout_ms = self.opts.request_timeout.as_millis() as u64;
        let id = self.registry().dispatch(
            function,
            worker.map_or(Pick::Route(None), Pick::Worker),
            Sink::Local(tx),
            None,
            self.opts.queue_depth,
            |id| Message::Invoke {
                id,
                function: function.to_string(),
                payload: serde_bytes::ByteBuf::from(Vec::from(payload)),
                timeout_ms,
                trace_id: trace_id.to_string(),
                http,
                traceparent: crate::telemetry::inject(&tracing::Span::current()),
                route: None,
            },
        )?;
        Ok(LocalCall {
            id,
            replies: rx,
            shared: Arc::clone(self),
        })
    }

    /// Delivers one answer to wherever its invocation came from. Never waits: an answer that
    /// does not fit in its destination's queue (an HTTP client or a worker that stopped reading)
    /// cancels that one invocation instead of stalling the connection it came from.
    pub fn deliver(&self, id: u64, sink: Sink, reply: Reply) {
        let delivered = match sink {
            Sink::Local(tx) => tx.try_send(reply).is_ok(),
            Sink::Remote {
                worker,
                id: their_id,
            } => {
                let Some(outbox) = self.registry().outbox(worker) else {
                    return;
                };
                let msg = match reply {
                    Reply::Done(outcome) => Message::Result {
                        id: their_id,
                        outcome,
                    },
                    Reply::Start(http) => Message::StreamStart { id: their_id, http },
                    Reply::Chunk(data) => Message::StreamChunk {
                        id: their_id,
                        data: serde_bytes::ByteBuf::from(Vec::from(data)),
                    },
                    Reply::End(error) => Message::StreamEnd {
                        id: their_id,
                        error,
                    },
                };
                match outbox.try_send(Outgoing::Msg(msg)) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(
                            worker,
                            id,
                            "a worker is not reading its answers; cancelling the invocation"
                        );
                        self.metrics.worker_lost("slow_reader");
                        false
                    }
                    // It has left; its departure cancels what it called.
                    Err(mpsc::error::TrySendError::Closed(_)) => true,
                }
            }
        };
        if !delivered {
            self.cancel(id);
        }
    }

    /// Cancels an invocation wherever it runs.
    pub fn cancel(&self, id: u64) {
        let target = self.registry().cancel(id);
        if let Some(t) = target {
            t.try_send();
        }
    }

    /// Fails what a departed (or stalled) worker owed with `worker_lost`, and cancels the calls it
    /// had made.
    pub fn fail_departure(&self, departure: registry::Departure, name: &str, message: &str) {
        if departure.resent > 0 {
            tracing::info!(worker = %name, count = departure.resent, "moved invocations it had not started to other workers");
        }
        for t in departure.abandoned {
            t.try_send();
        }
        for (id, sink) in departure.orphaned {
            let err = ErrorBody::new(ErrorCode::WorkerLost, message);
            self.deliver(id, sink, Reply::Done(Outcome::Error(err)));
        }
    }

    /// A worker's heartbeat carried its engine's health: a stall takes it out of routing and
    /// takes its work away; progress puts it back.
    pub fn worker_health(&self, worker: registry::WorkerId, health: crate::protocol::Health) {
        // Every heartbeat comes here; only a change of state costs more than the lock.
        let (stalled, name, departure) = {
            let mut registry = self.registry();
            let Some(stalled) = registry.set_health(worker, health) else {
                return;
            };
            let departure = if stalled {
                registry.evict(worker)
            } else {
                registry::Departure::default()
            };
            (stalled, registry.worker_name(worker), departure)
        };
        let name = name.unwrap_or_default();
        if stalled {
            tracing::error!(worker = %name, steps = health.steps, failed = departure.orphaned.len(), moved = departure.resent, "engine stalled: worker taken out of routing");
            self.metrics.worker_lost("stalled");
            let message = format!(
                "worker `{name}` stopped making progress (its engine stalled) while handling this request"
            );
            self.fail_departure(departure, &name, &message);
        } else {
            tracing::info!(worker = %name, steps = health.steps, "engine progressing again: worker back in routing")
        }
    }
}

/// An invocation made by the HTTP front. Dropping it before the answer arrives cancels it
/// (once answered, the registry no longer knows the id and the cancel is a no-op).
pub struct LocalCall {
    pub id: u64,
    pub replies: mpsc::Receiver<Reply>,
    shared: Arc<Shared>,
}

impl Drop for LocalCall {
    fn drop(&mut self) {
        let target = self.shared.registry().cancel(self.id);
        if let Some(t) = target {
            t.try_send();
        }
    }
}

/// Asks every infer worker for its engine statistics (1 s each, at once); silent ones are left out.
pub async fn engine_stats(shared: &Arc<Shared>) -> Vec<(String, crate::api::StatsSnapshot)> {
    const FUNCTION: &str = "inference::stats";
    let workers = shared.registry().workers_of(FUNCTION);
    let asks = workers.into_iter().map(|(id, name)| async move {
        let mut call = shared
            .invoke_local(FUNCTION, Some(id), Bytes::new(), None, "metrics")
            .ok()?;
        let reply = tokio::time::timeout(Duration::from_secs(1), call.replies.recv()).await;
        match reply {
            Ok(Some(Reply::Done(Outcome::Ok { payload, .. }))) => {
                serde_json::from_slice(&payload).ok().map(|s| (name, s))
            }
            _ => None,
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The bound sockets of a gateway.
pub struct Listeners {
    pub http: TcpListener,
    pub mesh: TcpListener,
}

/// Reloads the API keys and certificates on every `SIGHUP`.
async fn reload_on_hangup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: API keys reload only on restart");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received");
        shared.reload_secrets();
    }
}

/// Tells systemd the gateway is ready (its listeners are bound and served), keeps `STATUS=` up to
/// date, and feeds the watchdog from the runtime, through the registry's lock: a deadlock there
/// or in the runtime stops the feeding and systemd restarts the gateway.
async fn tell_systemd(shared: Arc<Shared>) {
    let status = |shared: &Shared| {
        let reg = shared.registry();
        let missing = reg.unserved_triggers();
        format!(
            "STATUS={} workers, {} triggers, {}",
            reg.worker_count(),
            reg.trigger_count(),
            if missing.is_empty() {
                "every trigger served".to_string()
            } else {
                format!("waiting for {}", missing.join(", "))
            }
        )
    };
    if !crate::liveness::notify(&format!("READY=1\n{}", status(&shared))) {
        return;
    }
    let watchdog = crate::liveness::feed_watchdog(|_| {
        // Takes the registry's lock: a gateway stuck on it is not healthy.
        let _ = shared.registry().worker_count();
        true
    });
    let status_lines = async {
        let mut last = String::new();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = status(&shared);
            if now != last {
                crate::liveness::notify(&now);
                last = now;
            }
        }
    };
    // One task: aborting it (at shutdown) stops both.
    tokio::join!(watchdog, status_lines);
}

/// Once a second: removes the triggers whose function has been without a worker for longer than
/// the grace period, so their routes answer 404 and may be bound to another function.
async fn expire_triggers(shared: Arc<Shared>) {
    let grace = shared.opts.trigger_grace;
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(grace));
    loop {
        tick.tick().await;
        let gone = shared
            .registry()
            .expire_triggers(std::time::Instant::now(), grace);
        for (method, path) in gone {
            tracing::info!(%method, %path, ?grace, "trigger removed: no worker served it for the grace period");
            if let Err(e) = shared.state.forget_trigger(&method, &path).await {
                tracing::warn!(error = %e, "cannot forget the trigger");
            }
        }
    }
}

/// Runs the gateway until `shutdown` completes, then drains and flushes.
pub async fn run(
    listeners: Listeners,
    opts: GatewayOptions,
    state: StateStore,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        http_budget: budget::Budget::new(opts.max_connections, opts.max_connections_per_ip),
        mesh_budget: budget::Budget::new(
            opts.max_mesh_connections,
            opts.max_mesh_connections_per_ip,
        ),
        secrets: RwLock::new(opts.secrets.clone()),
        opts,
        state,
        metrics: Metrics::default(),
        registry: Mutex::new(Registry::default()),
        closing: CancellationToken::new(),
    });
    shared
        .registry()
        .set_affinity_slack(shared.opts.affinity_slack);
    tracing::info!(state = %shared.state.describe(), "state store");
    match shared.state.triggers().await {
        Ok(triggers) => {
            for (method, path, function, requires) in triggers {
                // The store holds one function per route: nothing to conflict with.
                let _ = shared
                    .registry()
                    .register_trigger(&method, &path, &function, requires);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the remembered triggers; they return as workers register")
        }
    }
    tracing::info!(
        http = %listeners.http.local_addr()?,
        mesh = %listeners.mesh.local_addr()?,
        "gateway listening"
    );
    let reload_task = tokio::spawn(reload_on_hangup(Arc::clone(&shared)));
    let mesh_task = tokio::spawn(mesh::accept_loop(listeners.mesh, Arc::clone(&shared)));
    let http_task = tokio::spawn(http::serve(listeners.http, Arc::clone(&shared)));
    let systemd_task = tokio::spawn(tell_systemd(Arc::clone(&shared)));
    let expiry_task = tokio::spawn(expire_triggers(Arc::clone(&shared)));
    shutdown.await;
    systemd_task.abort();
    expiry_task.abort();
    crate::liveness::notify("STOPPING=1\nSTATUS=draining HTTP requests");
    tracing::info!("gateway shutting down: draining HTTP requests");
    shared.closing.cancel();
    let drain = shared.opts.drain_timeout;
    if tokio::time::timeout(drain, http_task).await.is_err() {
        tracing::warn!(?drain, "HTTP requests still running at the drain deadline");
    }
    mesh_task.abort();
    reload_task.abort();
    shared.state.flush_now()?;
    tracing::info!("gateway stopped; state flushed");
    Ok(())
}
