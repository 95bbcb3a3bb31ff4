//! `meshd up`: the gateway, a caller and an infer worker in one process, wired over real loopback
//! sockets — the same code paths as three machines, with one mesh token per role (the same grants as
//! a deployment) that never leaves the process.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine::EngineConfig;
use crate::gateway::{self, GatewayOptions, Listeners};
use crate::roles;
use crate::state::StateStore;
use crate::worker::WorkerOptions;

/// Options every worker of `up` shares, pointed at the gateway's bound mesh address.
fn worker_options(settings: &Settings, name: &str, url: &str, token: &str) -> WorkerOptions {
    WorkerOptions {
        name: name.to_string(),
        gateway_urls: vec![url.to_string()],
        token: token.to_string(),
        max_frame_bytes: settings.max_frame_bytes,
        max_concurrency: settings.max_concurrency,
        drain_timeout: Duration::from_secs(settings.drain_timeout_secs),
        heartbeat: settings.heartbeat(),
        tls: None,
    }
}

/// Runs the whole mesh until `shutdown`. `listeners` are bound by the caller (port 0 in tests).
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let token = || format!("{:032x}", rand::random::<u128>());
    let (caller_token, infer_token) = (token(), token());
    let roles = std::collections::BTreeMap::from([
        ("caller".to_string(), caller_token.clone()),
        ("infer".to_string(), infer_token.clone()),
    ]);
    let identities = crate::gateway::grants::Identities::new(None, &roles, &settings.grants())
        .map_err(anyhow::Error::msg)?;
    let url = format!("ws://{}", listeners.mesh.local_addr()?);
    let state = StateStore::from_settings(&settings).await?;
    let mut opts = GatewayOptions::from_settings(&settings, identities)?;
    // The mesh of `up` never leaves the process's loopback listener: no TLS there.
    opts.secrets.mesh_tls = None;

    let engine =
        crate::engine::start_generator(EngineConfig::from_settings(&settings), settings.generator)
            .await?;
    let stop_workers = CancellationToken::new();
    let caller = roles::caller(worker_options(&settings, "caller", &url, &caller_token));
    let infer = roles::infer(
        worker_options(&settings, "infer", &url, &infer_token),
        engine,
    );
    // Ready only once every route of both workers is registered: the infer worker's own trigger
    // alone must not make it look ready before the caller has registered the API's routes.
    opts.expected_triggers = [caller.triggers(), infer.triggers()].concat();
    let workers = [
        tokio::spawn(caller.run(stop_workers.clone().cancelled_owned())),
        tokio::spawn(infer.run(stop_workers.clone().cancelled_owned())),
    ];
    let result = gateway::run(listeners, opts, state, shutdown).await;
    stop_workers.cancel();
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(settings.drain_timeout_secs), w).await;
    }
    result
}

/// Binds a role's configured listeners.
pub async fn bind(settings: &Settings) -> anyhow::Result<Listeners> {
    let http = crate::config::resolve_addr(&settings.http_addr).map_err(anyhow::Error::msg)?;
    let mesh = crate::config::resolve_addr(&settings.mesh_addr).map_err(anyhow::Error::msg)?;
    Ok(Listeners {
        http: TcpListener::bind(http)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {http} (http_addr): {e}"))?,
        mesh: TcpListener::bind(mesh)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {mesh} (mesh_addr): {e}"))?,
    })
}
