//! Per-role worker identities, tried as an attacker would: a gateway with one token per role
//! (`--worker-token-file-for ROLE=PATH`), real caller and infer processes holding their own
//! tokens, and raw mesh peers ([`common::Peer`]) holding a real token and overstepping it.

mod common;

use std::time::Duration;

use common::*;
use meshd::protocol::{Message, Outcome};
use serde_json::json;

const CALLER_TOKEN: &str = "caller-token-0123456789abcdef";
const INFER_TOKEN: &str = "infer-token-0123456789abcdef";

/// A gateway that knows the caller and infer tokens (and no dev token).
fn role_gateway(dir: &std::path::Path, extra: &[&str]) -> Proc {
    let caller = dir.join("caller-token");
    let infer = dir.join("infer-token");
    std::fs::write(&caller, format!("{CALLER_TOKEN}\n")).unwrap();
    std::fs::write(&infer, format!("{INFER_TOKEN}\n")).unwrap();
    let data = dir.join("data");
    let caller_arg = format!("caller={}", caller.display());
    let infer_arg = format!("infer={}", infer.display());
    let mut args = vec![
        "gateway",
        "--http-addr",
        "127.0.0.1:0",
        "--mesh-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--worker-token-file-for",
        &caller_arg,
        "--worker-token-file-for",
        &infer_arg,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, true)
}

fn worker(role: &str, url: &str, token: &str, name: &str) -> Proc {
    let model = model();
    let mut args = vec![
        role,
        "--gateway-url",
        url,
        "--worker-token",
        token,
        "--name",
        name,
    ];
    if role == "infer" {
        // The grants are under test, not inference: the echo generator, no model.
        args.extend_from_slice(&["--generator", "echo", "--model", model.to_str().unwrap()]);
    }
    Proc::start(&args, false)
}

async fn metric(addr: std::net::SocketAddr, line: &str) -> bool {
    request(addr, "GET", "/metrics", "")
        .await
        .text()
        .contains(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_worker_cannot_take_the_chat_route_and_the_caller_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let gw = role_gateway(dir.path(), &[]);
    let (url, addr) = (gw.mesh_url(), gw.http());
    let _caller = worker("caller", &url, CALLER_TOKEN, "caller");
    let _infer = worker("infer", &url, INFER_TOKEN, "infer");
    ready(addr).await;

    // The infer token does not grant the route.
    let mut rogue = Peer::join(&url, INFER_TOKEN, "rogue-infer").await;
    rogue.register("inference::stats", false).await;
    rogue
        .trigger("POST", "/v1/chat/completions", "inference::stats")
        .await;
    let (reason, closed) = rogue.refusal().await;
    assert!(
        reason.contains("POST /v1/chat/completions") && reason.contains("role `infer`"),
        "{reason}"
    );
    assert!(closed, "a refused worker is disconnected");

    // The caller token grants the route, but it is bound: nobody re-binds it.
    let mut rogue = Peer::join(&url, CALLER_TOKEN, "rogue-caller").await;
    rogue.register("http::steal", false).await;
    rogue
        .trigger("POST", "/v1/chat/completions", "http::steal")
        .await;
    let (reason, closed) = rogue.refusal().await;
    assert!(
        reason.contains("bound to `http::run_inference_over_http`"),
        "{reason}"
    );
    assert!(closed);

    assert!(metric(addr, "meshd_workers_refused_total{reason=\"grant\"} 1").await);
    assert!(metric(addr, "meshd_workers_refused_total{reason=\"rebind\"} 1").await);
    assert!(gw.logs().contains("worker refused"));

    // The chat is still the caller's, and still answered.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 1});
    let r = request(addr, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let served = status_workers(addr, "http::run_inference_over_http").await;
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0].name, "caller");
    assert_eq!(served[0].served, 1);
    assert!(status_workers(addr, "http::steal").await.is_empty());
    let stats = status_workers(addr, "inference::stats").await;
    assert!(stats.iter().all(|w| w.name != "rogue-infer"), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_outside_the_grant_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let gw = role_gateway(dir.path(), &[]);
    let (url, addr) = (gw.mesh_url(), gw.http());
    let cases = [
        (INFER_TOKEN, "http::run_inference_over_http", "role `infer`"),
        (INFER_TOKEN, "math::add_two_numbers", "role `infer`"),
        (INFER_TOKEN, "inference::get_response", "role `infer`"),
        (CALLER_TOKEN, "inference::run_inference", "role `caller`"),
        (CALLER_TOKEN, "math::add", "role `caller`"),
        // Nobody serves a built-in's name.
        (CALLER_TOKEN, "state::get", "role `caller`"),
    ];
    for (token, function, role) in cases {
        let mut peer = Peer::join(&url, token, "overreach").await;
        peer.register(function, false).await;
        let (reason, closed) = peer.refusal().await;
        assert!(
            reason.contains(&format!("`{function}`")) && reason.contains(role),
            "{reason}"
        );
        assert!(closed);
    }
    assert!(metric(addr, "meshd_workers_refused_total{reason=\"grant\"} 6").await);
    // Within the grant: accepted and listed.
    let mut fine = Peer::join(&url, INFER_TOKEN, "fine").await;
    fine.register("inference::models", false).await;
    eventually(
        Duration::from_secs(5),
        "inference::models listed",
        || async { status_workers(addr, "inference::models").await.len() == 1 },
    )
    .await;
    assert!(fine.recv_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_calls_outside_a_roles_scopes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = role_gateway(dir.path(), &[]);
    let (url, addr) = (gw.mesh_url(), gw.http());
    let mut infer = Peer::join(&url, INFER_TOKEN, "infer").await;
    let mut caller = Peer::join(&url, CALLER_TOKEN, "caller").await;
    let incr = |scope: &str| json!({"scope": scope, "key": "running_total", "by": 5});

    // Granted: infer may incr math/*.
    let Outcome::Ok { payload, .. } = infer.call(1, "state::incr", &incr("math")).await else {
        panic!("the infer role may incr math");
    };
    let value: serde_json::Value = meshd::protocol::from_payload(&payload).unwrap();
    assert_eq!(value, json!({"value": 5}));

    let refused = [
        (
            "infer",
            "state::set",
            json!({"scope": "math", "key": "running_total", "value": 1}),
        ),
        ("infer", "state::incr", incr("billing")),
        (
            "infer",
            "state::delete",
            json!({"scope": "math", "key": "running_total"}),
        ),
        (
            "caller",
            "state::get",
            json!({"scope": "math", "key": "running_total"}),
        ),
        ("caller", "state::incr", incr("math")),
    ];
    for (i, (role, function, payload)) in refused.into_iter().enumerate() {
        let peer = if role == "infer" {
            &mut infer
        } else {
            &mut caller
        };
        match peer.call(10 + i as u64, function, &payload).await {
            Outcome::Error(e) => {
                assert_eq!(e.code, "forbidden", "{function}: {e}");
                assert!(e.message.contains(&format!("role `{role}`")), "{e}");
                assert_eq!(e.http_status(), 403);
            }
            other => panic!("{role}: {function} {payload} was allowed: {other:?}"),
        }
    }
    assert!(
        metric(
            addr,
            "meshd_workers_refused_total{reason=\"state_scope\"} 5"
        )
        .await
    );
    // Nothing refused changed anything: the total is still 5.
    let Outcome::Ok { payload, .. } = infer
        .call(
            2,
            "state::incr",
            &json!({"scope": "math", "key": "running_total", "by": 0}),
        )
        .await
    else {
        panic!("incr by 0");
    };
    let value: serde_json::Value = meshd::protocol::from_payload(&payload).unwrap();
    assert_eq!(value, json!({"value": 5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumability_is_the_grants_not_the_workers_claim() {
    let dir = tempfile::tempdir().unwrap();
    let gw = role_gateway(dir.path(), &[]);
    let (url, addr) = (gw.mesh_url(), gw.http());
    let _caller = worker("caller", &url, CALLER_TOKEN, "caller");
    // Two "infer" peers claim `math::add` is resumable (the grant says it is not): an increment
    // moved after a disconnect could be applied twice.
    let mut a = Peer::join(&url, INFER_TOKEN, "a").await;
    let mut b = Peer::join(&url, INFER_TOKEN, "b").await;
    a.register("math::add", true).await;
    b.register("math::add", true).await;
    eventually(
        Duration::from_secs(30),
        "the caller and both peers",
        || async {
            status_workers(addr, "math::add_two_numbers").await.len() == 1
                && status_workers(addr, "math::add").await.len() == 2
        },
    )
    .await;
    let post = tokio::spawn(async move {
        request(addr, "POST", "/math/add-two-numbers", r#"{"a": 1, "b": 2}"#).await
    });
    // Whichever peer gets the invocation hangs up without answering.
    let (got, a_got_it) = tokio::select! {
        m = a.recv() => (m, true),
        m = b.recv() => (m, false),
    };
    assert!(
        matches!(got, Some(Message::Invoke { ref function, .. }) if function == "math::add"),
        "{got:?}"
    );
    let (hangs_up, mut other) = if a_got_it { (a, b) } else { (b, a) };
    drop(hangs_up);
    // Its invocation fails; it never moves to the other peer.
    let r = post.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "worker_lost");
    let moved = other.recv_within(Duration::from_millis(500)).await;
    assert!(moved.is_none(), "the invocation moved: {moved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_outlives_its_worker_for_the_grace_period_then_frees_its_route() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--trigger-grace-secs", "2"],
    );
    let (url, addr) = (gw.mesh_url(), gw.http());
    let mut first = Peer::join(&url, TOKEN, "first").await;
    first.register("one::f", false).await;
    first.trigger("GET", "/x", "one::f").await;
    eventually(Duration::from_secs(5), "the trigger", || async {
        request(addr, "GET", "/x", "").await.status != 404
    })
    .await;
    // Even the dev token (every role) cannot re-bind a bound route.
    let mut second = Peer::join(&url, TOKEN, "second").await;
    second.register("two::g", false).await;
    second.trigger("GET", "/x", "two::g").await;
    let (reason, _) = second.refusal().await;
    assert!(reason.contains("bound to `one::f`"), "{reason}");

    drop(first);
    // Within the grace period the route stays, answering 503 for its missing worker...
    eventually(Duration::from_secs(5), "503 without the worker", || async {
        request(addr, "GET", "/x", "").await.status == 503
    })
    .await;
    // ...then it is gone, and free.
    eventually(Duration::from_secs(10), "the route removed", || async {
        request(addr, "GET", "/x", "").await.status == 404
    })
    .await;
    assert!(gw.logs().contains("trigger removed"));
    let mut third = Peer::join(&url, TOKEN, "third").await;
    third.register("two::g", false).await;
    third.trigger("GET", "/x", "two::g").await;
    // A round trip on the same connection: the gateway handles a worker's messages in order.
    let barrier = json!({"scope": "s", "key": "k"});
    assert!(matches!(
        third.call(1, "state::get", &barrier).await,
        Outcome::Ok { .. }
    ));
    let invoked = tokio::spawn(async move { request(addr, "GET", "/x", "").await });
    match third.recv().await {
        Some(Message::Invoke { function, .. }) => assert_eq!(function, "two::g"),
        other => panic!("expected the invocation on the new binding: {other:?}"),
    }
    drop(third);
    let _ = invoked.await;
}

/// What an infer worker announces and asks of routing is bounded: more models than a worker may
/// serve, or a model id past `MAX_MODEL_ID` bytes, is refused by name and disconnected (nothing
/// of it reaches `/v1/models`); a route hint naming a model id past the limit is a 400, not a
/// lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_models_and_route_hints_are_bounded() {
    use meshd::api::{MAX_MODELS_PER_WORKER, MAX_MODEL_ID};
    let dir = tempfile::tempdir().unwrap();
    let gw = role_gateway(dir.path(), &[]);
    // No caller or infer worker: the gateway is not ready (nothing serves its routes), and
    // this test speaks to it as workers only.
    let (url, addr) = (gw.mesh_url(), gw.http());
    let register = |models: Vec<String>| Message::RegisterFunction {
        name: "inference::models".into(),
        description: None,
        resumable: false,
        models,
    };

    let mut many = Peer::join(&url, INFER_TOKEN, "many-models").await;
    let models = (0..=MAX_MODELS_PER_WORKER)
        .map(|i| format!("m{i}"))
        .collect();
    many.send(register(models)).await;
    let (reason, closed) = many.refusal().await;
    assert!(
        reason.contains(&format!("at most {MAX_MODELS_PER_WORKER} models")),
        "{reason}"
    );
    assert!(closed);

    let mut long = Peer::join(&url, INFER_TOKEN, "long-model").await;
    long.send(register(vec!["x".repeat(MAX_MODEL_ID + 1)]))
        .await;
    let (reason, closed) = long.refusal().await;
    assert!(
        reason.contains(&format!("1 to {MAX_MODEL_ID} bytes")),
        "{reason}"
    );
    assert!(closed);
    assert!(metric(addr, "meshd_workers_refused_total{reason=\"models\"} 2").await);

    // Within the limits, the same announcement is taken: the boundary itself is allowed.
    let mut fine = Peer::join(&url, INFER_TOKEN, "fine").await;
    fine.send(register(vec!["y".repeat(MAX_MODEL_ID)])).await;
    // A round trip on the same connection: the registration above is handled by then.
    let _ = fine
        .call(1, "state::get", &json!({"scope": "s", "key": "k"}))
        .await;
    let served = status_workers(addr, "inference::models").await;
    assert!(served.iter().any(|w| w.name == "fine"), "{served:?}");

    // A route hint past the limit: answered with a 400 before any routing.
    let mut caller = Peer::join(&url, CALLER_TOKEN, "lying-caller").await;
    caller
        .send(Message::Invoke {
            id: 9,
            function: "inference::models".into(),
            payload: serde_bytes::ByteBuf::new(),
            timeout_ms: 5_000,
            trace_id: "t9".into(),
            http: None,
            traceparent: None,
            route: Some(Box::new(meshd::protocol::RouteHint {
                model: Some("z".repeat(MAX_MODEL_ID + 1)),
                affinity: Some(1),
            })),
        })
        .await;
    let outcome = loop {
        match caller.recv().await {
            Some(Message::Result { id: 9, outcome }) => break outcome,
            Some(_) => continue,
            None => panic!("the gateway closed the caller's connection"),
        }
    };
    match outcome {
        Outcome::Error(e) => {
            assert_eq!(e.code, "bad_request", "{e:?}");
            assert!(e.message.contains(&MAX_MODEL_ID.to_string()), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
}
