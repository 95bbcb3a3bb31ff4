//! Past one gateway: two gateways sharing one real redis-server, workers joined to both, a real
//! haproxy in front (round robin, health checks on `/readyz`), and one gateway killed mid-run.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

/// A gateway on `redis` at fixed ports (so that it can come back on them).
fn fleet_gateway(redis: &Redis, http: SocketAddr, mesh: SocketAddr) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let g = gateway_with(
        dir.path(),
        &http.to_string(),
        &mesh.to_string(),
        &["--state-url", &url, "--request-timeout-secs", "10"],
    );
    std::mem::forget(dir);
    g
}

fn addrs() -> (SocketAddr, SocketAddr) {
    let at = |p| SocketAddr::from(([127, 0, 0, 1], p));
    (at(free_port()), at(free_port()))
}

/// A worker joined to every gateway in `urls`.
fn joined(role: &str, urls: &[String], name: &str) -> Proc {
    let mut args = vec![role.to_string()];
    for u in urls {
        args.extend(["--gateway-url".to_string(), u.clone()]);
    }
    args.extend(
        ["--worker-token", TOKEN, "--name", name]
            .iter()
            .map(|s| s.to_string()),
    );
    if role == "infer" {
        args.extend(
            ["--generator", "echo", "--slots", "8"]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start(&args, false)
}

/// The gateways each worker of `function` says it is joined to, as gateway `addr` sees them.
async fn joined_gateways(addr: SocketAddr, function: &str) -> Vec<Vec<String>> {
    let r = request(addr, "GET", "/status", "").await;
    let status = r.json();
    status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["function"] == function)
        .flat_map(|f| f["workers"].as_array().unwrap().clone())
        .map(|w| {
            let mut g: Vec<String> = w["gateways"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            g.sort();
            g
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_behind_haproxy_survive_a_kill_9_without_losing_an_acknowledged_add() {
    let redis = Redis::start();
    let ((http_a, mesh_a), (http_b, mesh_b)) = (addrs(), addrs());
    let mut gw_a = fleet_gateway(&redis, http_a, mesh_a);
    let gw_b = fleet_gateway(&redis, http_b, mesh_b);
    let urls = [format!("ws://{mesh_a}"), format!("ws://{mesh_b}")];
    let _caller = joined("caller", &urls, "caller");
    let _infer1 = joined("infer", &urls, "infer-1");
    let _infer2 = joined("infer", &urls, "infer-2");
    ready(http_a).await;
    ready(http_b).await;
    let mut both = vec![mesh_a.to_string(), mesh_b.to_string()];
    both.sort();
    for gw in [http_a, http_b] {
        eventually(
            Duration::from_secs(10),
            "every worker on both gateways",
            || {
                let both = both.clone();
                async move {
                    let infer = joined_gateways(gw, "math::add").await;
                    let caller = joined_gateways(gw, "math::add_two_numbers").await;
                    infer.len() == 2 && infer.iter().chain(&caller).all(|g| *g == both)
                }
            },
        )
        .await;
    }
    let status = std::process::Command::new(bin())
        .args(["status", "--url", &format!("http://{http_b}")])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("JOINED GATEWAYS"), "{table}");
    assert!(
        table.contains(&format!("{}, {}", both[0], both[1])),
        "{table}"
    );

    let lb = Haproxy::start(&[http_a, http_b]);
    let acked = Arc::new(AtomicI64::new(0));
    let answered = Arc::new(AtomicI64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (acked, answered, attempts, slowest, stop) = (
                acked.clone(),
                answered.clone(),
                attempts.clone(),
                slowest.clone(),
                stop.clone(),
            );
            let lb = lb.addr;
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = format!(r#"{{"a": {i}, "b": 1}}"#);
                    let key = format!("fleet-{i}-{n}");
                    // Retried with its Idempotency-Key until acknowledged: applied once.
                    loop {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let start = Instant::now();
                        let answer = tokio::time::timeout(
                            Duration::from_secs(30),
                            idempotent_add(lb, &body, &key),
                        )
                        .await
                        .expect("a request hung past every deadline");
                        slowest.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                        if answer.as_ref().is_some_and(|(status, _)| *status == 200) {
                            acked.fetch_add(i + 1, Ordering::Relaxed);
                            answered.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    // Counted in acknowledged requests.
    let at_least = |n: i64| {
        let answered = answered.clone();
        async move {
            eventually(Duration::from_secs(60), "acknowledged additions", || {
                let a = answered.clone();
                async move { a.load(Ordering::Relaxed) > n }
            })
            .await
        }
    };
    at_least(1_000).await;

    // Streamed chats in flight on gateway A when it dies fail fast.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(http_a).await.unwrap();
        let body =
            r#"{"messages":[{"role":"user","content":"go"}],"max_tokens":500,"stream":true}"#;
        let resp = c
            .start("POST", "/v1/chat/completions", body.as_bytes(), &[])
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        streams.push((c, body));
    }
    gw_a.kill9();
    let killed = Instant::now();
    for (_c, mut body) in streams {
        let mut text = String::new();
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            text.push_str(&String::from_utf8_lossy(d));
                        }
                    }
                    Err(_) => break,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a stream on the killed gateway hung");
        assert!(
            !text.contains("[DONE]"),
            "a stream on the killed gateway completed"
        );
    }
    // New chats go through the other gateway at once: haproxy retries the refused connection.
    let chat = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    for _ in 0..4 {
        let mut c = Client::connect(lb.addr).await.unwrap();
        let r = c.post("/v1/chat/completions", chat).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(killed.elapsed() < Duration::from_secs(5));

    let before_restart = answered.load(Ordering::Relaxed);
    at_least(before_restart + 1_000).await;
    let gw_a = fleet_gateway(&redis, http_a, mesh_a);
    ready(http_a).await;
    eventually(Duration::from_secs(10), "the workers back on A", || {
        let both = both.clone();
        async move {
            let infer = joined_gateways(http_a, "math::add").await;
            infer.len() == 2 && infer.iter().all(|g| *g == both)
        }
    })
    .await;
    let after_restart = answered.load(Ordering::Relaxed);
    at_least(after_restart + 1_000).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let total_at = |addr| async move {
        let mut c = Client::connect(addr).await.unwrap();
        let r = add(&mut c, 0, 0).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["running_total"].as_i64().unwrap()
    };
    let acked = acked.load(Ordering::Relaxed);
    assert_eq!(
        total_at(http_a).await,
        acked,
        "every acknowledged addition, once"
    );
    assert_eq!(
        total_at(http_b).await,
        acked,
        "both gateways read one state"
    );
    let slowest = slowest.load(Ordering::Relaxed);
    eprintln!(
        "{} acknowledged in {} attempts; slowest attempt {slowest} ms",
        answered.load(Ordering::Relaxed),
        attempts.load(Ordering::Relaxed)
    );
    assert!(slowest < 12_000, "an attempt took {slowest} ms");
    drop(gw_a);
    drop(gw_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_does_not_disturb_the_others() {
    let redis = Redis::start();
    let ((http_a, mesh_a), (http_b, mesh_b)) = (addrs(), addrs());
    let mut gw_a = fleet_gateway(&redis, http_a, mesh_a);
    let gw_b = fleet_gateway(&redis, http_b, mesh_b);
    let urls = [format!("ws://{mesh_a}"), format!("ws://{mesh_b}")];
    let _caller = joined("caller", &urls, "caller");
    let _infer = joined("infer", &urls, "infer");
    ready(http_a).await;
    ready(http_b).await;
    // A streamed chat on B runs while A drains and leaves.
    let mut c = Client::connect(http_b).await.unwrap();
    let body = r#"{"messages":[{"role":"user","content":"go"}],"max_tokens":150,"stream":true}"#;
    let resp = c
        .start("POST", "/v1/chat/completions", body.as_bytes(), &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(gw_a.terminate().success(), "{}", gw_a.logs());
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("data: [DONE]"),
        "the stream on B was disturbed"
    );
    let mut c = Client::connect(http_b).await.unwrap();
    let r = add(&mut c, 2, 3).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop(gw_b);
}

/// A worker given one DNS name joins every address it resolves to, and follows the name as it
/// changes. The name lives in an `/etc/hosts` bind-mounted over the real one in the worker's own
/// mount namespace (so nothing outside the test sees it); needs root and `unshare`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_a_dns_name_to_every_gateway_behind_it() {
    let can = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        eprintln!("SKIPPED: this test needs root and unshare -m (a mount namespace of its own)");
        return;
    }
    let redis = Redis::start();
    let port = free_port();
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let (mesh_a, mesh_b) = (at([127, 0, 0, 1]), at([127, 0, 0, 2]));
    let http = |ip: [u8; 4]| SocketAddr::from((ip, free_port()));
    let (http_a, http_b) = (http([127, 0, 0, 1]), http([127, 0, 0, 1]));
    let _gw_a = fleet_gateway(&redis, http_a, mesh_a);
    let _gw_b = fleet_gateway(&redis, http_b, mesh_b);
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    // Rewritten in place (same inode), so the bind mount shows each new version.
    let write_hosts = |ips: &[&str]| {
        let text: String = ips
            .iter()
            .map(|ip| format!("{ip} gateways.meshd.test\n"))
            .collect();
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{text}")).unwrap();
    };
    write_hosts(&["127.0.0.1"]);
    let mount = format!(
        "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
        hosts.display()
    );
    let url = format!("ws://gateways.meshd.test:{port}");
    let _infer = Proc::start_wrapped(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &mount,
        ],
        &[
            "infer",
            "--gateway-url",
            &url,
            "--worker-token",
            TOKEN,
            "--name",
            "infer",
            "--generator",
            "echo",
            "--slots",
            "2",
        ],
        false,
        &[],
    );
    let infer_on = |gw: SocketAddr| async move { joined_gateways(gw, "math::add").await };
    eventually(
        Duration::from_secs(20),
        "joined A through the name",
        || async { infer_on(http_a).await == [vec![mesh_a.to_string()]] },
    )
    .await;
    assert!(
        infer_on(http_b).await.is_empty(),
        "B is not in the name yet"
    );
    write_hosts(&["127.0.0.1", "127.0.0.2"]);
    let both = vec![mesh_a.to_string(), mesh_b.to_string()];
    eventually(Duration::from_secs(20), "joined B when the name grew", || {
        let both = both.clone();
        async move { infer_on(http_b).await == [both.clone()] && infer_on(http_a).await == [both] }
    })
    .await;
    write_hosts(&["127.0.0.2"]);
    eventually(
        Duration::from_secs(20),
        "left A when the name dropped it",
        || async {
            infer_on(http_a).await.is_empty()
                && infer_on(http_b).await == [vec![mesh_b.to_string()]]
        },
    )
    .await;
}
