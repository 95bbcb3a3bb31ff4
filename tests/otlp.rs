//! OpenTelemetry export: gateway, caller and infer as real processes, each exporting OTLP/HTTP to
//! a receiver on loopback that decodes the official protobufs (`opentelemetry-proto`). One chat
//! request with a client `traceparent` must come back as one trace: the client's span → the
//! gateway's `http` span → the caller's `invoke` → the gateway's `route` → the infer worker's
//! `invoke`, each the parent of the next.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
async fn receiver() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let spans = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let spans = spans.clone();
            tokio::spawn(async move {
                // Keep-alive: one request after another on the same connection.
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                    assert!(head.starts_with("post /v1/traces "), "{head}");
                    let req = ExportTraceServiceRequest::decode(body.as_slice())
                        .expect("an OTLP protobuf export");
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| kv.value.as_ref())
                            .map(|v| format!("{:?}", v.value))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                spans.lock().unwrap().push(Seen {
                                    service: service.clone(),
                                    name: s.name,
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent: hex(&s.parent_span_id),
                                });
                            }
                        }
                    }
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if sock.write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// Gateway, caller and an echo infer worker, each exporting to `endpoint` with `env` besides.
async fn traced_mesh(endpoint: &str, env: &[(&str, &str)]) -> (tempfile::TempDir, Vec<Proc>) {
    let mut env = env.to_vec();
    env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_env(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &[], &env);
    let url = gw.mesh_url();
    let caller_args = [
        "caller",
        "--gateway-url",
        &url,
        "--worker-token",
        TOKEN,
        "--name",
        "caller",
    ];
    let caller = Proc::start_env(&caller_args, false, &env);
    let infer = infer_env(&url, "infer", &["--generator", "echo"], &env);
    ready(gw.http()).await;
    (dir, vec![gw, caller, infer])
}

/// Sends one chat completion, with `traceparent` when given.
async fn chat_once(gw: &Proc, traceparent: Option<&str>) {
    let mut c = Client::connect(gw.http()).await.unwrap();
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let headers: Vec<(&str, &str)> = traceparent
        .map(|t| ("traceparent", t))
        .into_iter()
        .collect();
    let r = c
        .send("POST", "/v1/chat/completions", body.as_bytes(), &headers)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The spans of `trace` as one chain under the client's span: gateway `http` → caller `invoke`
/// → gateway `route` → infer `invoke`, each the parent of the next; `None` until all arrived.
fn chain(seen: &Mutex<Vec<Seen>>, trace: &str, client_span: &str) -> Option<Vec<Seen>> {
    let spans: Vec<Seen> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect();
    let child_of = |parent: &str, service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.parent == parent && s.service.contains(service) && s.name == name)
            .cloned()
    };
    let http = child_of(client_span, "meshd-gateway", "http")?;
    let caller = child_of(&http.span_id, "meshd-caller", "invoke")?;
    let route = child_of(&caller.span_id, "meshd-gateway", "route")?;
    let infer = child_of(&route.span_id, "meshd-infer", "invoke")?;
    Some(vec![http, caller, route, infer])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_chat_request_is_one_trace_across_every_hop() {
    let (endpoint, seen) = receiver().await;
    let (_dir, procs) = traced_mesh(&endpoint, &[]).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    chat_once(&procs[0], Some(&format!("00-{trace}-{client_span}-01"))).await;
    eventually(Duration::from_secs(20), "the whole chain exported", || {
        let found = chain(&seen, trace, client_span).is_some();
        async move { found }
    })
    .await;
    let chain = chain(&seen, trace, client_span).unwrap();
    println!("one trace across {} hops: {chain:#?}", chain.len());
}

/// With a ratio sampler at 0, requests that enter without a sampled `traceparent` make no span in
/// any process; one that enters sampled is still traced across every hop, and one whose
/// `traceparent` says "not sampled" is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_decided_at_the_edge_and_unsampled_requests_export_nothing() {
    let (endpoint, seen) = receiver().await;
    let env = [
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ];
    let (_dir, procs) = traced_mesh(&endpoint, &env).await;
    for _ in 0..5 {
        chat_once(&procs[0], None).await;
    }
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    chat_once(
        &procs[0],
        Some(&format!("00-{unsampled}-b7ad6b7169203331-00")),
    )
    .await;
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    chat_once(&procs[0], Some(&format!("00-{trace}-{client_span}-01"))).await;
    eventually(
        Duration::from_secs(20),
        "the sampled chain exported",
        || {
            let found = chain(&seen, trace, client_span).is_some();
            async move { found }
        },
    )
    .await;
    // The batch exporters flush every 100 ms: anything else would have arrived by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stray: Vec<Seen> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id != trace)
        .cloned()
        .collect();
    assert!(stray.is_empty(), "spans of unsampled requests: {stray:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_no_traceparent_travels() {
    let (_endpoint, seen) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let mut peer = Peer::join(&gw.mesh_url(), TOKEN, "watcher").await;
    peer.register("probe::f", false).await;
    peer.trigger("GET", "/probe", "probe::f").await;
    // A round trip on the same connection: the gateway handles a worker's messages in order,
    // so the route is bound before the request below.
    let barrier = serde_json::json!({"scope": "s", "key": "k"});
    assert!(matches!(
        peer.call(1, "state::get", &barrier).await,
        meshd::protocol::Outcome::Ok { .. }
    ));
    let addr = gw.http();
    let call = tokio::spawn(async move {
        let mut c = Client::connect(addr).await.unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let _ = c.send("GET", "/probe", b"", &[("traceparent", tp)]).await;
    });
    // Off by default: the invocation carries no traceparent of the gateway's own making.
    let got = loop {
        match peer.recv().await {
            Some(meshd::protocol::Message::Invoke { traceparent, .. }) => break traceparent,
            Some(_) => continue,
            None => panic!("no invocation reached the peer"),
        }
    };
    assert_eq!(got, None);
    drop(peer);
    let _ = call.await;
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_traceparent_is_forwarded_only_when_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let url = gw.mesh_url();
    let mut callee = Peer::join(&url, TOKEN, "callee").await;
    callee.register("probe::f", false).await;
    let mut caller = Peer::join(&url, TOKEN, "caller").await;
    // The callee's registration is in place once a round trip on its connection has answered.
    let barrier = serde_json::json!({"scope": "s", "key": "k"});
    assert!(matches!(
        callee.call(1, "state::get", &barrier).await,
        meshd::protocol::Outcome::Ok { .. }
    ));
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let lies = ["x".repeat(60_000), "00-zz-zz-zz".to_string()];
    let sent = std::iter::once(good.to_string()).chain(lies);
    for (id, tp) in (10u64..).zip(sent) {
        caller
            .send(meshd::protocol::Message::Invoke {
                id,
                function: "probe::f".into(),
                payload: serde_bytes::ByteBuf::new(),
                timeout_ms: 5_000,
                trace_id: format!("t{id}"),
                http: None,
                traceparent: Some(tp.clone()),
                route: None,
            })
            .await;
        let forwarded = loop {
            match callee.recv().await {
                Some(meshd::protocol::Message::Invoke { traceparent, .. }) => break traceparent,
                Some(_) => continue,
                None => panic!("the invocation never reached the callee"),
            }
        };
        let expected = (tp == good).then(|| good.to_string());
        assert_eq!(forwarded, expected, "sent {:.40}", tp);
    }
}
