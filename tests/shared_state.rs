//! State on a real redis-server (started by each test on loopback, AOF `appendfsync always`), and
//! per-key rate limits: the same contract as sled, gateways that share it, Redis killed mid-run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshd::state::{contract, RedisOptions, StateStore};
use serde_json::json;

fn options(url: &str) -> RedisOptions {
    RedisOptions {
        url: url.into(),
        username: None,
        password_file: None,
        ca_file: None,
        wait_replicas: 0,
        timeout: Duration::from_millis(1000),
        pool: 2,
        cluster: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keeps_the_same_contract_as_sled() {
    let redis = Redis::start();
    let s = StateStore::connect_redis(options(&redis.url()))
        .await
        .unwrap();
    contract::scoped_keys(&s).await;
    contract::idempotent_increments(&s).await;
    contract::refusals_change_nothing(&s).await;
    contract::triggers(&s).await;
    contract::concurrent_increments(&s).await;
    contract::rate_limits(&s).await;
    // Idempotency records expire by themselves (24 h), and live in the scope's cluster slot.
    let ttl = "local ks = redis.call('KEYS', ARGV[1]); return redis.call('TTL', ks[1])";
    let ttl: i64 = redis
        .cli(&["eval", ttl, "0", "meshd:*:i:*"])
        .parse()
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_the_same_contract() {
    let cluster = RedisCluster::start();
    let s = StateStore::connect_redis(RedisOptions {
        cluster: true,
        ..options(&cluster.url())
    })
    .await
    .unwrap();
    assert!(
        s.describe().starts_with("redis cluster at"),
        "{}",
        s.describe()
    );
    contract::scoped_keys(&s).await;
    contract::idempotent_increments(&s).await;
    contract::refusals_change_nothing(&s).await;
    contract::triggers(&s).await;
    contract::concurrent_increments(&s).await;
    contract::rate_limits(&s).await;
    // The scopes really were spread over the nodes, each step within one slot.
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["dbsize"]) != "0")
        .count();
    assert!(holding >= 2, "the keys sit on {holding} node(s)");
    // WAIT means nothing through a cluster client: refused at once.
    let err = StateStore::connect_redis(RedisOptions {
        cluster: true,
        wait_replicas: 1,
        ..options(&cluster.url())
    })
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("state_wait_replicas"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_password_and_wait_for_replicas() {
    let redis = Redis::start();
    assert_eq!(redis.cli(&["config", "set", "requirepass", "s3cret"]), "OK");
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let s = StateStore::connect_redis(RedisOptions {
        password_file: Some(wrong),
        ..options(&redis.url())
    })
    .await
    .unwrap();
    let err = s.incr("m", "t", 1).await.unwrap_err().to_string();
    assert!(err.contains("unavailable"), "a wrong password: {err}");
    let right = dir.path().join("right");
    std::fs::write(&right, "s3cret\n").unwrap();
    let s = StateStore::connect_redis(RedisOptions {
        password_file: Some(right.clone()),
        ..options(&redis.url())
    })
    .await
    .unwrap();
    assert_eq!(s.incr("m", "t", 1).await.unwrap(), 1);
    // Asked to wait for a replica that does not exist: the write is not acknowledged, in time.
    let s = StateStore::connect_redis(RedisOptions {
        password_file: Some(right),
        wait_replicas: 1,
        timeout: Duration::from_millis(300),
        ..options(&redis.url())
    })
    .await
    .unwrap();
    let start = Instant::now();
    let err = s.incr("m", "t", 1).await.unwrap_err().to_string();
    assert!(err.contains("replicas"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // A TLS CA for a plain URL is a configuration error, said at once.
    let err = StateStore::connect_redis(RedisOptions {
        ca_file: Some("/nonexistent.pem".into()),
        ..options(&redis.url())
    })
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("state_ca_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_against_the_configured_ca() {
    let pki = Pki::new();
    let redis = Redis::start_tls(
        pki.path("gateway.pem").into(),
        pki.path("gateway-key.pem").into(),
    );
    assert!(redis.url().starts_with("rediss://"));
    let s = StateStore::connect_redis(RedisOptions {
        ca_file: Some(pki.path("ca.pem").into()),
        ..options(&redis.url())
    })
    .await
    .unwrap();
    assert_eq!(s.incr("m", "t", 2).await.unwrap(), 2);
    assert!(s.describe().contains("rediss://"), "{}", s.describe());
    // A server whose certificate the configured CA did not sign is never spoken to.
    let s = StateStore::connect_redis(RedisOptions {
        ca_file: Some(pki.path("other-ca.pem").into()),
        ..options(&redis.url())
    })
    .await
    .unwrap();
    let err = s.incr("m", "t", 2).await.unwrap_err().to_string();
    assert!(err.contains("unavailable"), "{err}");
}

/// A gateway on Redis, with a caller and an echo infer worker.
fn redis_mesh(redis: &Redis, http: &str, mesh: &str, extra: &[&str]) -> (Proc, Proc, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let mut args = vec!["--state-url", url.as_str()];
    args.extend_from_slice(extra);
    let gateway = gateway_with(dir.path(), http, mesh, &args);
    let url = gateway.mesh_url();
    let caller = caller(&url, "caller");
    let infer = echo_infer(&url, "infer", &[]);
    (gateway, caller, infer)
}

async fn total(addr: std::net::SocketAddr) -> i64 {
    let mut c = Client::connect(addr).await.unwrap();
    let r = add(&mut c, 0, 0).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["running_total"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_math_contract_holds_on_redis_and_the_state_outlives_the_gateway() {
    let redis = Redis::start();
    let (mut gateway, _caller, _infer) = redis_mesh(&redis, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let addr = gateway.http();
    ready_for_math(&gateway).await;
    assert!(
        gateway.logs().contains("redis at redis://127.0.0.1"),
        "{}",
        gateway.logs()
    );
    let mut c = Client::connect(addr).await.unwrap();
    let r = add(&mut c, 100, 200).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["c"], 300);
    assert_eq!(r.json()["running_total"], 300);
    let r = request(addr, "POST", "/math/add-two-numbers", r#"{"a": 1}"#).await;
    assert_eq!(r.status, 400);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                for _ in 0..20 {
                    let r = add(&mut c, i, 1).await.unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // 300 + Σ (i + 1) × 20 for i in 0..32
    assert_eq!(total(addr).await, 300 + 528 * 20);
    // The gateway dies and a new one starts with an empty data directory: the total, and the
    // routes it remembered, were in Redis.
    let mesh_addr = gateway.mesh.unwrap().to_string();
    gateway.kill9();
    let fresh = tempfile::tempdir().unwrap();
    let url = redis.url();
    let gateway = gateway_with(
        fresh.path(),
        &addr.to_string(),
        &mesh_addr,
        &["--state-url", &url],
    );
    let r = request(
        gateway.http(),
        "POST",
        "/math/add-two-numbers",
        r#"{"a":0,"b":0}"#,
    )
    .await;
    assert_ne!(r.status, 404, "the route was remembered: {}", r.text());
    ready(addr).await;
    assert_eq!(total(addr).await, 300 + 528 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_a_fast_503_and_loses_nothing_acknowledged() {
    let mut redis = Redis::start();
    let (gateway, _caller, _infer) = redis_mesh(
        &redis,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--state-timeout-ms", "500"],
    );
    let addr = gateway.http();
    ready_for_math(&gateway).await;
    let acked = Arc::new(AtomicI64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (acked, unavailable, slowest, stop) = (
                acked.clone(),
                unavailable.clone(),
                slowest.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = format!(r#"{{"a": {i}, "b": 1}}"#);
                    let key = format!("client-{i}-{n}");
                    // Retried with its Idempotency-Key until acknowledged: applied exactly once.
                    loop {
                        let start = Instant::now();
                        let r = idempotent_add(addr, &body, &key).await;
                        slowest.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                        match r {
                            Some((200, _)) => {
                                acked.fetch_add(i + 1, Ordering::Relaxed);
                                break;
                            }
                            Some((503, code)) => {
                                assert_eq!(code, "state_unavailable");
                                unavailable.fetch_add(1, Ordering::Relaxed);
                            }
                            other => panic!("unexpected answer {other:?}"),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    let at_least = |n: i64| {
        let acked = acked.clone();
        async move {
            eventually(Duration::from_secs(30), "acknowledged additions", || {
                let a = acked.clone();
                async move { a.load(Ordering::Relaxed) > n }
            })
            .await
        }
    };
    at_least(200).await;
    redis.kill9();
    eventually(Duration::from_secs(10), "503 state_unavailable", || {
        let u = unavailable.clone();
        async move { u.load(Ordering::Relaxed) > 8 }
    })
    .await;
    let acked_while_down = acked.load(Ordering::Relaxed);
    redis.restart();
    at_least(acked_while_down + 200).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        total(addr).await,
        acked.load(Ordering::Relaxed),
        "every acknowledged addition, each exactly once"
    );
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(slowest < 3_000, "a request took {slowest} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starts_without_redis_answers_503_and_heals() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--state-url", &url, "--state-timeout-ms", "300"],
    );
    let mesh = gateway.mesh_url();
    let (_caller, _infer) = (caller(&mesh, "caller"), echo_infer(&mesh, "infer", &[]));
    let addr = gateway.http();
    ready_for_math(&gateway).await;
    let start = Instant::now();
    let r = request(addr, "POST", "/math/add-two-numbers", r#"{"a":1,"b":2}"#).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "state_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert!(start.elapsed() < Duration::from_secs(3));
    let _redis = Redis::start_on(port);
    eventually(Duration::from_secs(20), "state back", || async move {
        let r = request(addr, "POST", "/math/add-two-numbers", r#"{"a":1,"b":2}"#).await;
        r.status == 200
    })
    .await;
    assert_eq!(total(addr).await, 3, "the 503s added nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limit_holds_exactly_across_two_gateways() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-limited rpm=7\nk-free\n").unwrap();
    let keys_flag = ["--api-keys-file", keys.to_str().unwrap()];
    let a = redis_mesh(&redis, "127.0.0.1:0", "127.0.0.1:0", &keys_flag);
    let b = redis_mesh(&redis, "127.0.0.1:0", "127.0.0.1:0", &keys_flag);
    let gateways = [a.0.http(), b.0.http()];
    for g in [&a.0, &b.0] {
        ready_for_math(g).await;
    }
    // Start well inside a minute's window.
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if into_minute > 45 {
        tokio::time::sleep(Duration::from_secs(61 - into_minute)).await;
    }
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let addr = gateways[i % 2];
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                c.send(
                    "POST",
                    "/math/add-two-numbers",
                    br#"{"a":1,"b":0}"#,
                    &[("authorization", "Bearer k-limited")],
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "7");
        assert!(r.headers.contains_key("x-ratelimit-reset-requests"));
        match r.status {
            200 => ok += 1,
            429 => {
                let e = &r.json()["error"];
                assert_eq!(e["code"], "rate_limit_exceeded");
                assert_eq!(e["type"], "rate_limit_error");
                assert!(e["message"]
                    .as_str()
                    .unwrap()
                    .contains("requests per minute"));
                assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
                let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "retry-after {retry}");
            }
            s => panic!("status {s}: {}", r.text()),
        }
    }
    assert_eq!(
        ok, 7,
        "exactly the limit passed, through both gateways together"
    );
    // Another key is not touched by this one's limit, and carries no limit headers.
    let mut c = Client::connect(gateways[1]).await.unwrap();
    let r = c
        .send(
            "POST",
            "/math/add-two-numbers",
            br#"{"a":0,"b":0}"#,
            &[("authorization", "Bearer k-free")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["running_total"],
        7,
        "the refused requests added nothing"
    );
    assert!(!r.headers.contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_count_the_prompt_and_max_tokens_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let body = json!({
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 10,
    })
    .to_string();
    let cost = (body.len() as u64).div_ceil(4) + 10;
    std::fs::write(&keys, format!("k tpm={}\n", cost * 3)).unwrap();
    let gateway = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--api-keys-file", keys.to_str().unwrap()],
    );
    let url = gateway.mesh_url();
    let (_caller, _infer) = (caller(&url, "caller"), echo_infer(&url, "infer", &[]));
    let addr = gateway.http();
    ready_for_math(&gateway).await;
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if into_minute > 50 {
        tokio::time::sleep(Duration::from_secs(61 - into_minute)).await;
    }
    let mut c = Client::connect(addr).await.unwrap();
    let mut remaining = vec![];
    for _ in 0..4 {
        let r = c
            .send(
                "POST",
                "/v1/chat/completions",
                body.as_bytes(),
                &[("authorization", "Bearer k")],
            )
            .await
            .unwrap();
        assert!(!r.headers.contains_key("x-ratelimit-limit-requests"));
        assert_eq!(
            r.headers["x-ratelimit-limit-tokens"],
            (cost * 3).to_string()
        );
        let left = r.headers["x-ratelimit-remaining-tokens"].to_str().unwrap();
        remaining.push((r.status, left.to_string()));
    }
    let want: Vec<(u16, String)> = [(200, cost * 2), (200, cost), (200, 0), (429, 0)]
        .into_iter()
        .map(|(s, n)| (s, n.to_string()))
        .collect();
    assert_eq!(remaining, want);
}
