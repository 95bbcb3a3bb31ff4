//! The gateway's routing tables: live workers, the functions and triggers they registered, and
//! every invocation in flight. Bookkeeping under one lock: nothing here waits, but an invoke is
//! queued on its worker's connection under the lock, in the same step that routes it, so that
//! whatever else is queued under the lock (a drain confirmation) is ordered after it.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::protocol::{ErrorBody, ErrorCode, HttpResponseHead, Message, Outcome, RouteHint};
use crate::transport::{Outbox, Outgoing};

pub type WorkerId = u64;
pub type InvocationId = u64;

/// What a local (HTTP) caller receives for its invocation.
#[derive(Debug)]
pub enum Reply {
    Done(Outcome),
    Start(Option<HttpResponseHead>),
    Chunk(Bytes),
    End(Option<ErrorBody>),
}

/// Where an invocation's answer goes.
#[derive(Debug, Clone)]
pub enum Sink {
    /// The gateway's own HTTP front.
    Local(mpsc::Sender<Reply>),
    /// A worker that called through the gateway; `id` is its own invocation id.
    Remote { worker: WorkerId, id: u64 },
}

struct Worker {
    name: String,
    outbox: Outbox,
    inflight: usize,
    /// Invocations routed to it since it connected.
    served: u64,
    draining: bool,
    /// Its engine reports no progress while it holds work: out of routing until it steps again.
    stalled: bool,
    /// Its engine's decode steps, as last reported.
    steps: Option<u64>,
    /// Work its engine holds for others, as last reported: counted in its load.
    backlog: usize,
    /// The models it serves; empty: it takes any invocation.
    models: Vec<String>,
    /// The gateways it says it is joined to.
    gateways: Vec<String>,
}

struct Pending {
    worker: WorkerId,
    function: String,
    sink: Sink,
    origin: Option<(WorkerId, u64)>,
    /// For a resumable function not yet `Started`: the invoke, to re-send if its worker leaves.
    resend: Option<Message>,
}

/// Model ids the registry remembers as once served (past it, a model whose workers are gone
/// answers 404 rather than 503).
const MAX_MODELS_SEEN: usize = 1024;

/// How [`Registry::dispatch`] picks the worker.
pub enum Pick<'a> {
    /// By the hint (a model, an affinity key), else the least loaded.
    Route(Option<&'a RouteHint>),
    /// This one (the metrics' calls to every infer worker).
    Worker(WorkerId),
}

/// A worker chosen for an invocation.
pub struct Route {
    pub id: InvocationId,
    pub outbox: Outbox,
    pub worker: WorkerId,
}

/// A cancel to send to the worker running `id`.
pub struct CancelTarget {
    pub id: InvocationId,
    pub outbox: Outbox,
}

impl CancelTarget {
    fn message(&self) -> crate::transport::Outgoing {
        crate::transport::Outgoing::Msg(Message::Cancel { id: self.id })
    }

    /// Never waits: a full outbox means the worker is gone or stuck anyway.
    pub fn try_send(self) {
        let _ = self.outbox.try_send(self.message());
    }
}

/// What became of a removed worker's invocations.
#[derive(Default)]
pub struct Departure {
    /// Answers it owed: each gets a `worker_lost` error.
    pub orphaned: Vec<(InvocationId, Sink)>,
    /// Calls it had made: each is cancelled where it runs.
    pub abandoned: Vec<CancelTarget>,
    /// Invocations it had not started, now queued on another worker.
    pub resent: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    NoWorker,
    Overloaded {
        depth: usize,
    },
    /// No worker has ever served this model here.
    UnknownModel {
        model: String,
        served: Vec<String>,
    },
    /// Workers served this model, and none is live now.
    ModelGone {
        model: String,
    },
}

impl RouteError {
    pub fn to_error(&self, function: &str) -> ErrorBody {
        match self {
            RouteError::NoWorker => ErrorBody::new(
                ErrorCode::NoWorker,
                format!("no live worker serves `{function}`"),
            ),
            RouteError::Overloaded { depth } => ErrorBody::new(
                ErrorCode::Overloaded,
                format!("`{function}` already has {depth} invocations in flight; retry shortly"),
            ),
            RouteError::UnknownModel { model, served } => ErrorBody::new(
                ErrorCode::ModelNotFound,
                format!(
                    "The model `{model}` does not exist; the live workers serve: {}",
                    if served.is_empty() {
                        "none".to_string()
                    } else {
                        served.join(", ")
                    }
                ),
            )
            .with_param("model"),
            RouteError::ModelGone { model } => ErrorBody::new(
                ErrorCode::NoWorker,
                format!("no live worker serves the model `{model}` now; retry shortly"),
            ),
        }
    }
}

#[derive(Default)]
pub struct Registry {
    workers: HashMap<WorkerId, Worker>,
    /// Function → workers that serve it, in registration order.
    functions: HashMap<String, Vec<WorkerId>>,
    function_inflight: HashMap<String, usize>,
    /// (method, path) → function.
    triggers: HashMap<(String, String), String>,
    /// Function → what it calls, declared with its triggers (readiness waits for them too).
    requires: HashMap<String, Vec<String>>,
    pending: HashMap<InvocationId, Pending>,
    /// Functions whose workers report `Started` (their unstarted invocations can move).
    resumable: std::collections::HashSet<String>,
    /// Functions behind triggers that have no connected worker, and since when.
    unserved_since: HashMap<String, std::time::Instant>,
    by_origin: HashMap<(WorkerId, u64), InvocationId>,
    next_id: InvocationId,
    rotation: usize,
    /// Every model a worker has announced since the gateway started.
    models_seen: std::collections::HashSet<String>,
    /// How many more invocations in flight than the least-loaded worker an affinity's worker may
    /// hold before the invocation goes to the least-loaded one instead.
    affinity_slack: usize,
    /// Invocations with an affinity key: sent to their key's worker, or past it for load.
    pub affinity_kept: u64,
    pub affinity_overflowed: u64,
}

/// One line of `meshd status` / the metrics: a function and its workers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FunctionStatus {
    pub function: String,
    pub workers: Vec<WorkerStatus>,
    pub inflight: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub name: String,
    pub id: WorkerId,
    pub inflight: usize,
    pub served: u64,
    pub draining: bool,
    pub stalled: bool,
    /// Decode steps of its engine (infer workers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_steps: Option<u64>,
    /// The gateway addresses the worker says it is joined to (this one among them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

impl Registry {
    pub fn add_worker(&mut self, id: WorkerId, name: String, outbox: Outbox) {
        self.workers.insert(
            id,
            Worker {
                name,
                outbox,
                inflight: 0,
                served: 0,
                draining: false,
                stalled: false,
                steps: None,
                backlog: 0,
                models: Vec::new(),
                gateways: Vec::new(),
            },
        );
    }

    pub fn set_affinity_slack(&mut self, slack: usize) {
        self.affinity_slack = slack;
    }

    /// The models live workers serve, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .workers
            .values()
            .filter(|w| !w.draining && !w.stalled)
            .flat_map(|w| w.models.iter().cloned())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Records that `worker` serves `function` (and, for an infer worker, `models`). `Err` names
    /// the limit a worker's announced models break (nothing is recorded then): each model id
    /// non-empty and at most `MAX_MODEL_ID` bytes, at most `MAX_MODELS_PER_WORKER` in all.
    pub fn register_function(
        &mut self,
        worker: WorkerId,
        function: &str,
        resumable: bool,
        models: &[String],
    ) -> Result<(), String> {
        use crate::api::{MAX_MODELS_PER_WORKER, MAX_MODEL_ID};
        if let Some(w) = self.workers.get_mut(&worker) {
            if let Some(bad) = models
                .iter()
                .find(|m| m.is_empty() || m.len() > MAX_MODEL_ID)
            {
                return Err(format!(
                    "a model id must be 1 to {MAX_MODEL_ID} bytes (got {})",
                    bad.len()
                ));
            }
            let mut all = w.models.clone();
            for m in models {
                if !all.contains(m) {
                    all.push(m.clone());
                }
            }
            if all.len() > MAX_MODELS_PER_WORKER {
                return Err(format!(
                    "a worker may serve at most {MAX_MODELS_PER_WORKER} models (announced {})",
                    all.len()
                ));
            }
            // Remembered for 503-not-404 once its workers go; bounded, so a worker that
            // reconnects with new names each time cannot grow it without end.
            for m in &all {
                if self.models_seen.len() < MAX_MODELS_SEEN {
                    self.models_seen.insert(m.clone());
                }
            }
            w.models = all;
        }
        if resumable {
            self.resumable.insert(function.to_string());
        }
        let list = self.functions.entry(function.to_string()).or_default();
        if !list.contains(&worker) {
            list.push(worker);
        }
        Ok(())
    }

    pub fn unregister_function(&mut self, worker: WorkerId, function: &str) {
        if let Some(list) = self.functions.get_mut(function) {
            list.retain(|w| *w != worker);
        }
    }

    /// Binds `method path` to `function`. A route already bound to another function stays as it
    /// is: `Err` names that function.
    pub fn register_trigger(
        &mut self,
        method: &str,
        path: &str,
        function: &str,
        requires: Vec<String>,
    ) -> Result<(), String> {
        let route = (method.to_ascii_uppercase(), path.to_string());
        match self.triggers.get(&route) {
            Some(owner) if owner != function => return Err(owner.clone()),
            Some(_) => {}
            None => {
                self.triggers.insert(route, function.to_string());
            }
        }
        if !requires.is_empty() {
            self.requires.insert(function.to_string(), requires);
        }
        Ok(())
    }

    /// Removes the triggers whose function has had no connected worker (draining and stalled ones
    /// count as connected) for longer than `grace`, and answers their routes: the routes are free
    /// to be bound again.
    pub fn expire_triggers(
        &mut self,
        now: std::time::Instant,
        grace: std::time::Duration,
    ) -> Vec<(String, String)> {
        let served = |f: &String| {
            self.functions
                .get(f)
                .is_some_and(|ws| ws.iter().any(|w| self.workers.contains_key(w)))
        };
        let functions: std::collections::HashSet<String> =
            self.triggers.values().cloned().collect();
        let (present, absent): (Vec<String>, Vec<String>) =
            functions.into_iter().partition(|f| served(f));
        for f in present {
            self.unserved_since.remove(&f);
        }
        let mut expired = std::collections::HashSet::new();
        for f in absent {
            let since = *self.unserved_since.entry(f.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                expired.insert(f);
            }
        }
        let mut gone = Vec::new();
        self.triggers.retain(|route, f| {
            let keep = !expired.contains(f);
            if !keep {
                gone.push(route.clone());
            }
            keep
        });
        for f in &expired {
            self.unserved_since.remove(f);
            self.requires.remove(f);
        }
        gone.sort();
        gone
    }

    /// The function behind `method path`; `Err(true)` when the path exists with another method.
    pub fn trigger(&self, method: &str, path: &str) -> Result<String, bool> {
        if let Some(f) = self.triggers.get(&(method.to_string(), path.to_string())) {
            return Ok(f.clone());
        }
        Err(self.triggers.keys().any(|(_, p)| p == path))
    }

    pub fn set_draining(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.draining = true;
        }
    }

    fn live_workers(&self, function: &str) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.functions
            .get(function)
            .into_iter()
            .flatten()
            .filter_map(|id| self.workers.get(id).map(|w| (*id, w)))
            .filter(|(_, w)| !w.draining && !w.stalled)
    }

    /// Records the gateways a worker says it is joined to (at most 16, each at most 256 bytes:
    /// what a worker says is outside input).
    pub fn set_gateways(&mut self, worker: WorkerId, mut gateways: Vec<String>) {
        const MOST: usize = 16;
        const LONGEST: usize = 256;
        gateways.truncate(MOST);
        gateways.retain(|g| g.len() <= LONGEST);
        if let Some(w) = self.workers.get_mut(&worker) {
            w.gateways = gateways;
        }
    }

    /// Records a worker's engine health. Answers `Some(true)` when it has just stalled (take its
    /// work away: [`Registry::evict`]), `Some(false)` when it has just recovered.
    pub fn set_health(
        &mut self,
        worker: WorkerId,
        health: crate::protocol::Health,
    ) -> Option<bool> {
        let w = self.workers.get_mut(&worker)?;
        w.steps = Some(health.steps);
        w.backlog = usize::try_from(health.backlog).unwrap_or(usize::MAX);
        let was = std::mem::replace(&mut w.stalled, health.stalled);
        (was != health.stalled).then_some(health.stalled)
    }

    /// Names of the workers whose engine is stalled.
    pub fn stalled_workers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.stalled)
            .map(|w| w.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Functions behind triggers that have no live worker (empty means ready).
    pub fn unserved_triggers(&self) -> Vec<String> {
        let mut missing: Vec<String> = self
            .triggers
            .values()
            .flat_map(|f| std::iter::once(f).chain(self.requires.get(f).into_iter().flatten()))
            .filter(|f| self.live_workers(f).next().is_none())
            .cloned()
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }

    pub fn trigger_count(&self) -> usize {
        self.triggers.len()
    }

    /// Routes `function` (to `worker`, else to the least-loaded live one), builds its invoke for
    /// the new id and queues it on that worker's connection. A full connection is `overloaded`, a
    /// closed one `worker_lost`; either way nothing stays in flight.
    pub fn dispatch(
        &mut self,
        function: &str,
        worker: Pick<'_>,
        sink: Sink,
        origin: Option<(WorkerId, u64)>,
        queue_depth: usize,
        invoke: impl FnOnce(InvocationId) -> Message,
    ) -> Result<InvocationId, ErrorBody> {
        let route = match worker {
            Pick::Route(hint) => self.route(function, sink, origin, queue_depth, hint),
            Pick::Worker(w) => self.route_to(w, function, sink),
        }
        .map_err(|e| e.to_error(function))?;
        let msg = invoke(route.id);
        self.remember(route.id, &msg);
        match route.outbox.try_send(Outgoing::Msg(msg)) {
            Ok(()) => Ok(route.id),
            Err(e) => {
                self.finish(route.id);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => ErrorBody::new(
                        ErrorCode::Overloaded,
                        format!("the worker serving `{function}` is not keeping up; retry shortly"),
                    ),
                    // Its connection is gone; the registry hears of it a moment later.
                    mpsc::error::TrySendError::Closed(_) => ErrorBody::new(
                        ErrorCode::WorkerLost,
                        format!("the worker chosen for `{function}` has just disconnected; retry"),
                    ),
                })
            }
        }
    }

    /// Picks a live worker for `function` (one serving the hint's model; the affinity key's
    /// worker while its load allows; else the least loaded, ties rotating) and records the
    /// invocation.
    fn route(
        &mut self,
        function: &str,
        sink: Sink,
        origin: Option<(WorkerId, u64)>,
        queue_depth: usize,
        hint: Option<&RouteHint>,
    ) -> Result<Route, RouteError> {
        let inflight = self.function_inflight.get(function).copied().unwrap_or(0);
        let candidates = self.candidates(function, None, hint)?;
        if inflight >= queue_depth {
            return Err(RouteError::Overloaded { depth: inflight });
        }
        let worker = self.choose_for(candidates, hint.and_then(|h| h.affinity));
        Ok(self.record(worker, function, sink, origin))
    }

    /// The live workers of `function` (but `except`) that may take an invocation with `hint`,
    /// with their loads.
    fn candidates(
        &self,
        function: &str,
        except: Option<WorkerId>,
        hint: Option<&RouteHint>,
    ) -> Result<Vec<(WorkerId, usize)>, RouteError> {
        let model = hint.and_then(|h| h.model.as_deref());
        let live: Vec<(WorkerId, &Worker)> = self
            .live_workers(function)
            .filter(|(id, _)| Some(*id) != except)
            .collect();
        if live.is_empty() {
            return Err(RouteError::NoWorker);
        }
        let serving: Vec<(WorkerId, usize)> = live
            .iter()
            .filter(|(_, w)| {
                model.is_none_or(|m| w.models.is_empty() || w.models.iter().any(|x| x == m))
            })
            .map(|(id, w)| (*id, w.inflight.saturating_add(w.backlog)))
            .collect();
        match model {
            Some(m) if serving.is_empty() => Err(if self.models_seen.contains(m) {
                RouteError::ModelGone {
                    model: m.to_string(),
                }
            } else {
                RouteError::UnknownModel {
                    model: m.to_string(),
                    served: self.models(),
                }
            }),
            _ => Ok(serving),
        }
    }

    /// The affinity key's worker (rendezvous hashing over worker names, so a key keeps its worker
    /// across reconnects and only the keys of a worker that leaves move) unless it holds more
    /// than `affinity_slack` invocations beyond the least loaded; else the least loaded. A slack of
    /// 0 routes by load alone.
    fn choose_for(
        &mut self,
        candidates: Vec<(WorkerId, usize)>,
        affinity: Option<u64>,
    ) -> WorkerId {
        let Some(key) = affinity.filter(|_| self.affinity_slack > 0) else {
            return self.choose(candidates);
        };
        let least = candidates.iter().map(|(_, l)| *l).min().unwrap_or(0);
        let (home, load) = candidates
            .iter()
            .max_by_key(|(id, _)| {
                let name = self.workers.get(id).map_or("", |w| w.name.as_str());
                (rendezvous(key, name), *id)
            })
            .copied()
            .expect("candidates is not empty");
        if load <= least + self.affinity_slack {
            self.affinity_kept += 1;
            home
        } else {
            self.affinity_overflowed += 1;
            self.choose(candidates)
        }
    }

    /// The least-loaded candidate; ties rotate.
    fn choose(&mut self, candidates: Vec<(WorkerId, usize)>) -> WorkerId {
        self.rotation = self.rotation.wrapping_add(1);
        let start = self.rotation % candidates.len();
        candidates[start..]
            .iter()
            .chain(&candidates[..start])
            .min_by_key(|(_, load)| *load)
            .map(|(w, _)| *w)
            .expect("candidates is not empty")
    }

    /// Keeps the invoke of a resumable function until its worker says `Started`.
    fn remember(&mut self, id: InvocationId, invoke: &Message) {
        if let Some(p) = self.pending.get_mut(&id) {
            if self.resumable.contains(&p.function) {
                p.resend = Some(invoke.clone());
            }
        }
    }

    /// The worker running `id` has begun it: it can no longer move.
    pub fn started(&mut self, id: InvocationId, from: WorkerId) {
        if let Some(p) = self.pending.get_mut(&id).filter(|p| p.worker == from) {
            p.resend = None;
        }
    }

    /// Routes to one given worker (the gateway asking each worker of a function, for metrics).
    fn route_to(
        &mut self,
        worker: WorkerId,
        function: &str,
        sink: Sink,
    ) -> Result<Route, RouteError> {
        if !self.live_workers(function).any(|(id, _)| id == worker) {
            return Err(RouteError::NoWorker);
        }
        Ok(self.record(worker, function, sink, None))
    }

    /// The live workers serving `function`, with their names.
    pub fn workers_of(&self, function: &str) -> Vec<(WorkerId, String)> {
        self.live_workers(function)
            .map(|(id, w)| (id, w.name.clone()))
            .collect()
    }

    fn record(
        &mut self,
        worker: WorkerId,
        function: &str,
        sink: Sink,
        origin: Option<(WorkerId, u64)>,
    ) -> Route {
        self.next_id += 1;
        let id = self.next_id;
        let w = self.workers.get_mut(&worker).expect("live worker");
        w.inflight += 1;
        w.served += 1;
        let outbox = w.outbox.clone();
        *self
            .function_inflight
            .entry(function.to_string())
            .or_default() += 1;
        if let Some(o) = origin {
            self.by_origin.insert(o, id);
        }
        self.pending.insert(
            id,
            Pending {
                worker,
                function: function.to_string(),
                sink,
                origin,
                resend: None,
            },
        );
        Route { id, outbox, worker }
    }

    /// The sink of a running invocation, if `from` is the worker running it.
    pub fn sink(&self, id: InvocationId, from: WorkerId) -> Option<Sink> {
        self.pending
            .get(&id)
            .filter(|p| p.worker == from)
            .map(|p| p.sink.clone())
    }

    /// Ends an invocation answered by `from`; returns where the answer goes.
    pub fn complete(&mut self, id: InvocationId, from: WorkerId) -> Option<Sink> {
        if self.pending.get(&id)?.worker != from {
            return None;
        }
        self.finish(id).map(|p| p.sink)
    }

    fn finish(&mut self, id: InvocationId) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(w) = self.workers.get_mut(&p.worker) {
            w.inflight = w.inflight.saturating_sub(1);
        }
        if let Some(n) = self.function_inflight.get_mut(&p.function) {
            *n = n.saturating_sub(1);
        }
        if let Some(o) = p.origin {
            self.by_origin.remove(&o);
        }
        Some(p)
    }

    /// Cancels an invocation (its HTTP client left, or its deadline passed).
    pub fn cancel(&mut self, id: InvocationId) -> Option<CancelTarget> {
        let p = self.finish(id)?;
        let outbox = self.workers.get(&p.worker)?.outbox.clone();
        Some(CancelTarget { id, outbox })
    }

    /// Cancels what worker `origin` called as its invocation `id`.
    pub fn cancel_from_origin(&mut self, origin: WorkerId, id: u64) -> Option<CancelTarget> {
        let gid = *self.by_origin.get(&(origin, id))?;
        self.cancel(gid)
    }

    pub fn worker_name(&self, worker: WorkerId) -> Option<String> {
        self.workers.get(&worker).map(|w| w.name.clone())
    }

    pub fn outbox(&self, worker: WorkerId) -> Option<Outbox> {
        self.workers.get(&worker).map(|w| w.outbox.clone())
    }

    /// Removes a worker and everything it registered; says what its departure leaves behind.
    pub fn remove_worker(&mut self, worker: WorkerId) -> Departure {
        self.workers.remove(&worker);
        for list in self.functions.values_mut() {
            list.retain(|w| *w != worker);
        }
        let mut departure = self.take_work(worker, None);
        let ids: Vec<InvocationId> = self.pending.keys().copied().collect();
        for id in ids {
            let called_from_here =
                matches!(self.pending[&id].sink, Sink::Remote { worker: w, .. } if w == worker);
            if called_from_here {
                if let Some(c) = self.cancel(id) {
                    departure.abandoned.push(c);
                }
            }
        }
        departure
    }

    /// Takes every invocation away from a worker that stays connected but cannot do its work (a
    /// stalled engine): like a departure, and each one is also cancelled on that worker.
    pub fn evict(&mut self, worker: WorkerId) -> Departure {
        match self.outbox(worker) {
            Some(outbox) => self.take_work(worker, Some(&outbox)),
            None => Departure::default(),
        }
    }

    /// Ends every invocation running on `worker` (no longer routable): an unstarted resumable one
    /// moves to another live worker, any other is orphaned. Each is also cancelled on the worker
    /// through `still_connected`, when it is.
    fn take_work(&mut self, worker: WorkerId, still_connected: Option<&Outbox>) -> Departure {
        let mut departure = Departure::default();
        let running: Vec<InvocationId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == worker)
            .map(|(id, _)| *id)
            .collect();
        for id in running {
            if let Some(outbox) = still_connected {
                departure.abandoned.push(CancelTarget {
                    id,
                    outbox: outbox.clone(),
                });
            }
            let p = self.finish(id).expect("present");
            if matches!(p.sink, Sink::Remote { worker: w, .. } if w == worker) {
                continue;
            }
            let hint = match &p.resend {
                Some(Message::Invoke { route, .. }) => route.as_deref().cloned(),
                _ => None,
            };
            let elsewhere = self
                .candidates(&p.function, Some(worker), hint.as_ref())
                .unwrap_or_default();
            match p.resend {
                Some(mut invoke) if !elsewhere.is_empty() => {
                    let to = self.choose_for(elsewhere, hint.and_then(|h| h.affinity));
                    let route = self.record(to, &p.function, p.sink, p.origin);
                    if let Message::Invoke { id, .. } = &mut invoke {
                        *id = route.id;
                    }
                    self.remember(route.id, &invoke);
                    if route.outbox.try_send(Outgoing::Msg(invoke)).is_ok() {
                        departure.resent += 1;
                    } else {
                        let p = self.finish(route.id).expect("just recorded");
                        departure.orphaned.push((route.id, p.sink));
                    }
                }
                _ => departure.orphaned.push((id, p.sink)),
            }
        }
        departure
    }

    pub fn status(&self) -> Vec<FunctionStatus> {
        let mut out: Vec<FunctionStatus> = self
            .functions
            .iter()
            .map(|(f, ids)| FunctionStatus {
                function: f.clone(),
                workers: ids
                    .iter()
                    .filter_map(|id| self.workers.get(id).map(|w| (id, w)))
                    .map(|(id, w)| WorkerStatus {
                        name: w.name.clone(),
                        id: *id,
                        inflight: w.inflight,
                        served: w.served,
                        draining: w.draining,
                        stalled: w.stalled,
                        engine_steps: w.steps,
                        gateways: w.gateways.clone(),
                    })
                    .collect(),
                inflight: self.function_inflight.get(f).copied().unwrap_or(0),
            })
            .filter(|s| !s.workers.is_empty())
            .collect();
        out.sort_by(|a, b| a.function.cmp(&b.function));
        out
    }
}

/// The rendezvous (highest random weight) score of worker `name` for affinity `key`: FNV-1a over
/// both, stable across processes and builds.
fn rendezvous(key: u64, name: &str) -> u64 {
    let mut fnv = crate::protocol::Fnv::default();
    fnv.write(&key.to_le_bytes());
    fnv.write(name.as_bytes());
    let mut h = fnv.0;
    // FNV's low bits mix poorly for short inputs: finish with a 64-bit avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox() -> Outbox {
        mpsc::channel(8).0
    }

    fn local() -> Sink {
        Sink::Local(mpsc::channel(8).0)
    }

    /// The invoke the registry would queue for `function` under `id`.
    fn invoke_of(function: &'static str) -> impl Fn(InvocationId) -> Message + Copy {
        move |id| Message::Invoke {
            id,
            function: function.into(),
            payload: serde_bytes::ByteBuf::from(vec![1]),
            timeout_ms: 1000,
            trace_id: "t".into(),
            http: None,
            traceparent: None,
            route: None,
        }
    }

    #[test]
    fn routes_to_the_least_loaded_worker_and_spreads_ties() {
        let mut r = Registry::default();
        r.add_worker(1, "a".into(), outbox());
        r.add_worker(2, "b".into(), outbox());
        r.register_function(1, "f", false, &[]).unwrap();
        r.register_function(2, "f", false, &[]).unwrap();
        let first = r.route("f", local(), None, 100, None).unwrap();
        let second = r.route("f", local(), None, 100, None).unwrap();
        assert_ne!(
            first.worker, second.worker,
            "a loaded worker is passed over"
        );
        r.complete(first.id, first.worker).unwrap();
        r.complete(second.id, second.worker).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let route = r.route("f", local(), None, 100, None).unwrap();
            seen.insert(route.worker);
            r.complete(route.id, route.worker);
        }
        assert_eq!(seen.len(), 2, "idle workers share the work");
    }

    #[test]
    fn a_model_goes_only_to_its_workers_and_unknown_or_gone_models_are_told_apart() {
        let mut r = Registry::default();
        r.add_worker(1, "gemma".into(), outbox());
        r.add_worker(2, "smol".into(), outbox());
        r.register_function(1, "gen", true, &["gemma-3".into()])
            .unwrap();
        r.register_function(2, "gen", true, &["smol".into()])
            .unwrap();
        let hint = |m: &str| RouteHint {
            model: Some(m.into()),
            affinity: None,
        };
        for _ in 0..4 {
            let a = r
                .route("gen", local(), None, 99, Some(&hint("smol")))
                .unwrap();
            assert_eq!(a.worker, 2);
            let b = r
                .route("gen", local(), None, 99, Some(&hint("gemma-3")))
                .unwrap();
            assert_eq!(b.worker, 1);
        }
        assert_eq!(r.models(), vec!["gemma-3".to_string(), "smol".to_string()]);
        let err = r
            .route("gen", local(), None, 99, Some(&hint("gpt-4")))
            .err();
        assert!(
            matches!(err, Some(RouteError::UnknownModel { ref served, .. }) if served.len() == 2)
        );
        assert_eq!(
            err.unwrap().to_error("gen").code,
            ErrorCode::ModelNotFound.as_str()
        );
        r.remove_worker(2);
        assert_eq!(
            r.route("gen", local(), None, 99, Some(&hint("smol"))).err(),
            Some(RouteError::ModelGone {
                model: "smol".into()
            })
        );
        assert_eq!(r.models(), vec!["gemma-3".to_string()]);
    }

    #[test]
    fn announced_models_are_bounded_and_a_refused_announcement_records_nothing() {
        use crate::api::{MAX_MODELS_PER_WORKER, MAX_MODEL_ID};
        let mut r = Registry::default();
        r.add_worker(1, "a".into(), outbox());
        let names = |n: usize| (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>();
        r.register_function(1, "f", false, &names(MAX_MODELS_PER_WORKER - 1))
            .unwrap();
        // The limit counts every model the worker announced, over all its registrations.
        let err = r
            .register_function(1, "g", false, &["extra-1".into(), "extra-2".into()])
            .unwrap_err();
        assert!(err.contains(&MAX_MODELS_PER_WORKER.to_string()), "{err}");
        assert!(r
            .register_function(1, "g", false, &[String::new()])
            .is_err());
        let long = "x".repeat(MAX_MODEL_ID + 1);
        assert!(r.register_function(1, "g", false, &[long]).is_err());
        assert_eq!(r.models().len(), MAX_MODELS_PER_WORKER - 1);
        assert!(
            r.live_workers("g").next().is_none(),
            "nothing of a refusal is kept"
        );
        r.register_function(1, "g", false, &["x".repeat(MAX_MODEL_ID)])
            .unwrap();
        assert_eq!(r.models().len(), MAX_MODELS_PER_WORKER);
    }

    #[test]
    fn an_engines_backlog_for_others_counts_in_its_load() {
        use crate::protocol::Health;
        let mut r = Registry::default();
        r.add_worker(1, "shared-upstream".into(), outbox());
        r.add_worker(2, "own".into(), outbox());
        r.register_function(1, "gen", false, &[]).unwrap();
        r.register_function(2, "gen", false, &[]).unwrap();
        let busy = Health {
            steps: 1,
            busy: true,
            stalled: false,
            backlog: 5,
        };
        r.set_health(1, busy);
        for _ in 0..4 {
            let route = r.route("gen", local(), None, 99, None).unwrap();
            assert_eq!(route.worker, 2, "worker 1's engine is busy for others");
        }
        r.set_health(1, Health { backlog: 0, ..busy });
        let route = r.route("gen", local(), None, 99, None).unwrap();
        assert_eq!(route.worker, 1);
    }

    #[test]
    fn an_affinity_key_keeps_its_worker_until_the_load_is_too_uneven() {
        let mut r = Registry::default();
        r.set_affinity_slack(2);
        for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
            r.add_worker(id, name.into(), outbox());
            r.register_function(id, "gen", false, &[]).unwrap();
        }
        let key = |k: u64| RouteHint {
            model: None,
            affinity: Some(k),
        };
        // Keys spread over the workers, and each keeps its worker while the load is even.
        let mut homes = std::collections::HashMap::new();
        for k in 0..30 {
            let route = r.route("gen", local(), None, 999, Some(&key(k))).unwrap();
            homes.insert(k, route.worker);
            r.complete(route.id, route.worker);
        }
        let spread: std::collections::HashSet<_> = homes.values().collect();
        assert_eq!(spread.len(), 3, "30 keys over 3 workers: {homes:?}");
        for k in 0..30 {
            let route = r.route("gen", local(), None, 999, Some(&key(k))).unwrap();
            assert_eq!(route.worker, homes[&k], "key {k} moved");
            r.complete(route.id, route.worker);
        }
        // One key's worker fills up: it takes `slack` more than the others, then the rest
        // overflow to the least loaded.
        let home = homes[&7];
        let mut sent = Vec::new();
        for _ in 0..6 {
            let route = r.route("gen", local(), None, 999, Some(&key(7))).unwrap();
            sent.push((route.id, route.worker));
        }
        let homes_share: Vec<bool> = sent.iter().map(|(_, w)| *w == home).collect();
        // 3 at home (0, 1, 2 ≤ 0 + 2), then one to each other worker (3 > 0 + 2), then home
        // again (3 ≤ 1 + 2).
        assert_eq!(homes_share, [true, true, true, false, false, true]);
        assert_eq!(r.affinity_overflowed, 2);
        for (id, w) in sent {
            r.complete(id, w);
        }
        // When a worker leaves, only its keys move.
        let gone = homes[&0];
        r.remove_worker(gone);
        for k in 0..30 {
            let route = r.route("gen", local(), None, 999, Some(&key(k))).unwrap();
            if homes[&k] != gone {
                assert_eq!(route.worker, homes[&k], "key {k} moved");
            }
            r.complete(route.id, route.worker);
        }
    }

    #[test]
    fn no_worker_and_overload_are_told_apart() {
        let mut r = Registry::default();
        assert_eq!(
            r.route("f", local(), None, 1, None).err(),
            Some(RouteError::NoWorker)
        );
        r.add_worker(1, "a".into(), outbox());
        r.register_function(1, "f", false, &[]).unwrap();
        r.route("f", local(), None, 1, None).unwrap();
        assert_eq!(
            r.route("f", local(), None, 1, None).err(),
            Some(RouteError::Overloaded { depth: 1 })
        );
        r.set_draining(1);
        assert_eq!(
            r.route("f", local(), None, 9, None).err(),
            Some(RouteError::NoWorker)
        );
    }

    #[test]
    fn a_departing_worker_orphans_its_work_and_abandons_its_calls() {
        let mut r = Registry::default();
        r.add_worker(1, "caller".into(), outbox());
        r.add_worker(2, "infer".into(), outbox());
        r.register_function(1, "outer", false, &[]).unwrap();
        r.register_function(2, "inner", false, &[]).unwrap();
        let outer = r.route("outer", local(), None, 9, None).unwrap();
        let inner = r
            .route(
                "inner",
                Sink::Remote { worker: 1, id: 5 },
                Some((1, 5)),
                9,
                None,
            )
            .unwrap();
        let d = r.remove_worker(1);
        assert_eq!(d.orphaned.len(), 1);
        assert_eq!(d.orphaned[0].0, outer.id);
        assert_eq!(d.abandoned.len(), 1);
        assert_eq!(d.abandoned[0].id, inner.id);
        assert!(r.complete(inner.id, 2).is_none(), "already cancelled");
        assert!(r.cancel_from_origin(1, 5).is_none());
    }

    #[test]
    fn an_unstarted_resumable_invocation_moves_to_another_worker() {
        let mut r = Registry::default();
        let (tx_a, rx_a) = mpsc::channel(8);
        let (tx_b, rx_b) = mpsc::channel(8);
        r.add_worker(1, "a".into(), tx_a);
        r.add_worker(2, "b".into(), tx_b);
        let mut inbox = HashMap::from([(1, rx_a), (2, rx_b)]);
        r.register_function(1, "gen", true, &[]).unwrap();
        r.register_function(2, "gen", true, &[]).unwrap();
        let invoke = invoke_of("gen");
        let first = r.route("gen", local(), None, 9, None).unwrap();
        r.remember(first.id, &invoke(first.id));
        let second = r.route("gen", local(), None, 9, None).unwrap();
        r.remember(second.id, &invoke(second.id));
        assert_ne!(first.worker, second.worker);
        r.started(second.id, second.worker);
        // Both ran on different workers; the one on `first.worker` had not started.
        let d = r.remove_worker(first.worker);
        assert!(d.orphaned.is_empty());
        assert_eq!(d.resent, 1);
        let to = inbox.get_mut(&second.worker).unwrap();
        let Ok(Outgoing::Msg(Message::Invoke { id: moved, .. })) = to.try_recv() else {
            panic!("the invoke was not queued on the other worker")
        };
        assert!(
            r.complete(moved, second.worker).is_some(),
            "now runs on the other worker"
        );
        // A started one is orphaned, not moved.
        let d = r.remove_worker(second.worker);
        assert_eq!(d.orphaned.len(), 1);
        assert_eq!(d.resent, 0);
    }

    #[test]
    fn a_stalled_worker_leaves_routing_and_its_work_is_failed_moved_and_cancelled() {
        use crate::protocol::Health;
        let mut r = Registry::default();
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        r.add_worker(1, "a".into(), tx_a);
        r.add_worker(2, "b".into(), tx_b);
        r.register_function(1, "gen", true, &[]).unwrap();
        let invoke = invoke_of("gen");
        let started = r
            .dispatch("gen", Pick::Route(None), local(), None, 9, invoke)
            .unwrap();
        let queued = r
            .dispatch("gen", Pick::Route(None), local(), None, 9, invoke)
            .unwrap();
        r.started(started, 1);
        r.register_function(2, "gen", true, &[]).unwrap();
        while rx_a.try_recv().is_ok() {}
        let health = |steps, stalled| Health {
            steps,
            busy: true,
            stalled,
            backlog: 0,
        };
        assert_eq!(r.set_health(1, health(5, false)), None, "no change");
        assert_eq!(r.set_health(1, health(5, true)), Some(true), "just stalled");
        assert_eq!(r.set_health(1, health(5, true)), None, "still stalled");
        assert_eq!(r.stalled_workers(), ["a"]);
        let d = r.evict(1);
        assert_eq!(d.orphaned.len(), 1, "the started one fails");
        assert_eq!(d.orphaned[0].0, started);
        assert_eq!(d.resent, 1, "the queued one moves");
        let Ok(Outgoing::Msg(Message::Invoke { id: moved, .. })) = rx_b.try_recv() else {
            panic!("the unstarted invoke did not move to the healthy worker")
        };
        assert_ne!(moved, queued);
        let mut cancelled: Vec<u64> = d.abandoned.iter().map(|c| c.id).collect();
        cancelled.sort();
        assert_eq!(
            cancelled,
            [started, queued],
            "both are cancelled on the stalled worker"
        );
        // Nothing new goes to it while stalled; it is routable again once it steps.
        for _ in 0..3 {
            let route = r.route("gen", local(), None, 99, None).unwrap();
            assert_eq!(route.worker, 2);
        }
        let status = r.status();
        let a = status[0].workers.iter().find(|w| w.id == 1).unwrap();
        assert!(a.stalled);
        assert_eq!(a.engine_steps, Some(5));
        assert_eq!(r.set_health(1, health(6, false)), Some(false), "recovered");
        assert!(r.stalled_workers().is_empty());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(r.route("gen", local(), None, 99, None).unwrap().worker);
        }
        assert!(seen.contains(&1), "back in routing");
    }

    #[test]
    fn dispatch_queues_the_invoke_at_once_and_a_full_or_closed_connection_leaves_nothing_behind() {
        let mut r = Registry::default();
        let (tx, mut rx) = mpsc::channel(1);
        r.add_worker(1, "a".into(), tx);
        r.register_function(1, "f", false, &[]).unwrap();
        let invoke = invoke_of("f");
        let id = r
            .dispatch("f", Pick::Route(None), local(), None, 9, invoke)
            .unwrap();
        // Already on the connection: a confirmation queued after this call comes after it.
        let Ok(Outgoing::Msg(Message::Invoke { id: sent, .. })) = rx.try_recv() else {
            panic!("the invoke was not queued")
        };
        assert_eq!(sent, id);
        let _fills = r
            .dispatch("f", Pick::Route(None), local(), None, 9, invoke)
            .unwrap();
        let err = r
            .dispatch("f", Pick::Route(None), local(), None, 9, invoke)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded.as_str());
        assert_eq!(
            r.status()[0].inflight,
            2,
            "the refused one is not in flight"
        );
    }

    #[test]
    fn only_the_running_worker_may_answer() {
        let mut r = Registry::default();
        r.add_worker(1, "a".into(), outbox());
        r.add_worker(2, "b".into(), outbox());
        r.register_function(1, "f", false, &[]).unwrap();
        let route = r.route("f", local(), None, 9, None).unwrap();
        assert!(r.complete(route.id, 2).is_none());
        assert!(r.complete(route.id, 1).is_some());
    }

    #[test]
    fn triggers_survive_their_worker_and_readiness_names_the_gap() {
        let mut r = Registry::default();
        r.add_worker(1, "a".into(), outbox());
        r.register_function(1, "f", false, &[]).unwrap();
        r.register_trigger("post", "/x", "f", vec!["g".into()])
            .unwrap();
        assert_eq!(r.unserved_triggers(), ["g"]);
        r.register_function(1, "g", false, &[]).unwrap();
        assert_eq!(r.trigger("POST", "/x"), Ok("f".to_string()));
        assert_eq!(r.trigger("GET", "/x"), Err(true));
        assert_eq!(r.trigger("GET", "/y"), Err(false));
        assert!(r.unserved_triggers().is_empty());
        r.remove_worker(1);
        assert_eq!(r.unserved_triggers(), ["f", "g"]);
    }

    #[test]
    fn a_bound_route_is_never_rebound_until_it_expires() {
        use std::time::{Duration, Instant};
        let grace = Duration::from_secs(60);
        let mut r = Registry::default();
        r.add_worker(1, "a".into(), outbox());
        r.register_function(1, "f", false, &[]).unwrap();
        r.register_trigger("POST", "/x", "f", vec![]).unwrap();
        r.register_trigger("POST", "/x", "f", vec![]).unwrap();
        assert_eq!(
            r.register_trigger("post", "/x", "evil", vec![]),
            Err("f".to_string())
        );
        assert_eq!(r.trigger("POST", "/x"), Ok("f".to_string()));

        let t0 = Instant::now();
        assert!(r.expire_triggers(t0, grace).is_empty(), "served");
        r.remove_worker(1);
        assert!(r.expire_triggers(t0, grace).is_empty(), "grace starts");
        assert!(r.expire_triggers(t0 + grace / 2, grace).is_empty());
        // The worker comes back within the grace: the clock starts again when it leaves again.
        r.add_worker(2, "a".into(), outbox());
        r.register_function(2, "f", false, &[]).unwrap();
        assert!(r.expire_triggers(t0 + grace / 2, grace).is_empty());
        r.remove_worker(2);
        assert!(r.expire_triggers(t0 + grace, grace).is_empty());
        assert_eq!(
            r.expire_triggers(t0 + grace * 2, grace),
            [("POST".to_string(), "/x".to_string())]
        );
        assert_eq!(r.trigger("POST", "/x"), Err(false));
        r.register_trigger("POST", "/x", "other", vec![]).unwrap();
    }

    #[test]
    fn what_a_worker_says_of_its_gateways_is_bounded() {
        let mut r = Registry::default();
        r.add_worker(1, "w".into(), outbox());
        r.register_function(1, "f", false, &[]).unwrap();
        let mut said: Vec<String> = (0..40).map(|i| format!("10.0.0.{i}:49134")).collect();
        said[3] = "x".repeat(257);
        r.set_gateways(1, said);
        let shown = &r.status()[0].workers[0].gateways;
        assert_eq!(shown.len(), 15, "16 kept, the over-long one dropped");
        assert!(shown.iter().all(|g| g.len() <= 256));
        r.set_gateways(99, vec!["a".into()]);
    }
}
