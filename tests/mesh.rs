//! The mesh end to end: gateway, caller and infer as separate `meshd` processes on loopback.

mod common;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const SUCCESS: &str = "You've connected two workers and they're interoperating seamlessly, now let's add a few more workers to expand this project's functionality.";

struct Mesh {
    gateway: Proc,
    _caller: Proc,
    infer: Proc,
    dir: tempfile::TempDir,
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let url = gateway.mesh_url();
    let m = Mesh {
        _caller: caller(&url, "caller"),
        infer: echo_infer(&url, "infer", &[]),
        gateway,
        dir,
    };
    ready(m.gateway.http()).await;
    m
}

async fn total(addr: std::net::SocketAddr) -> i64 {
    let mut c = Client::connect(addr).await.unwrap();
    let r = add(&mut c, 0, 0).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["running_total"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_contract_holds_across_three_processes_and_a_restart() {
    let mut m = mesh().await;
    let addr = m.gateway.http();
    let mut c = Client::connect(addr).await.unwrap();
    let r = add(&mut c, 100, 200).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"c": 300, "running_total": 300, "success": SUCCESS})
    );
    assert!(r.headers.contains_key("x-request-id"));
    let r = add(&mut c, 50, 50).await.unwrap();
    assert_eq!(
        r.json(),
        json!({"c": 100, "running_total": 400, "success": SUCCESS})
    );

    // Bad input: a clear 400 and nothing added.
    let bad: [(&str, u16, &str); 6] = [
        ("not json", 400, "not valid JSON"),
        (r#"{"a": 1}"#, 400, "`b` is missing"),
        (r#"{"a": "1", "b": 2}"#, 400, "must be a number"),
        (r#"{"a": 1e999, "b": 2}"#, 400, "not valid JSON"),
        (r#"{"a": 9223372036854775807, "b": 1}"#, 400, "overflows"),
        (r#"{"a": 1.5, "b": 2}"#, 400, "must be an integer"),
    ];
    for (body, status, want) in bad {
        let r = request(addr, "POST", "/math/add-two-numbers", body).await;
        assert_eq!(r.status, status, "{}", r.text());
        let err = &r.json()["error"];
        assert!(
            err["message"].as_str().unwrap().contains(want),
            "{}",
            r.text()
        );
        assert!(err["type"].is_string() && err["code"].is_string());
    }
    // An oversized body is refused from its Content-Length, before it is read.
    let head =
        "POST /math/add-two-numbers HTTP/1.1\r\nhost: x\r\ncontent-length: 2097152\r\n\r\n{\"a\":";
    let answer = common::raw_exchange(addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("exceeds the limit"), "{answer}");
    assert_eq!(total(addr).await, 400);

    let r = request(addr, "GET", "/nope", "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = request(addr, "GET", "/math/add-two-numbers", "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");

    // A graceful restart of the gateway keeps the total; the workers come back by themselves.
    let http = addr.to_string();
    let mesh_addr = m.gateway.mesh.unwrap().to_string();
    assert!(m.gateway.terminate().success(), "{}", m.gateway.logs());
    m.gateway = gateway(m.dir.path(), &http, &mesh_addr);
    ready(addr).await;
    let mut c = Client::connect(addr).await.unwrap();
    let r = add(&mut c, 1, 2).await.unwrap();
    assert_eq!(r.json()["running_total"], 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_lose_no_update() {
    let m = mesh().await;
    let addr = m.gateway.http();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                for _ in 0..50 {
                    let r = add(&mut c, i, 1).await.unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Σ (i + 1) × 50 for i in 0..32
    assert_eq!(total(addr).await, 528 * 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_keeps_every_acknowledged_increment() {
    let mut m = mesh().await;
    let addr = m.gateway.http();
    let mesh_addr = m.gateway.mesh.unwrap().to_string();
    let acked = Arc::new(AtomicI64::new(0));
    let unanswered = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (acked, unanswered, stop) = (acked.clone(), unanswered.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = Client::connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    loop {
                        match add(&mut c, 1, 1).await {
                            Ok(r) if r.status == 200 => {
                                acked.fetch_add(2, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => {
                                // The gateway died with this request in flight: it may or may not
                                // have been applied, but it was never acknowledged.
                                unanswered.fetch_add(2, Ordering::Relaxed);
                                break;
                            }
                        }
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    common::eventually(Duration::from_secs(30), "some acknowledged writes", || {
        let a = acked.clone();
        async move { a.load(Ordering::Relaxed) > 400 }
    })
    .await;
    m.gateway.kill9();
    let acked_at_kill = acked.load(Ordering::Relaxed);
    m.gateway = gateway(m.dir.path(), &addr.to_string(), &mesh_addr);
    ready(addr).await;
    // The restarted gateway read back every increment acknowledged before the kill.
    let total_after_restart = total(addr).await;
    assert!(
        total_after_restart >= acked_at_kill,
        "after the restart the total is {total_after_restart}, but {acked_at_kill} was acknowledged before the kill"
    );
    let before = acked.load(Ordering::Relaxed);
    common::eventually(Duration::from_secs(30), "writes after the restart", || {
        let a = acked.clone();
        async move { a.load(Ordering::Relaxed) > before + 200 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let total = total(addr).await;
    let acked = acked.load(Ordering::Relaxed);
    let unanswered = unanswered.load(Ordering::Relaxed);
    assert!(
        total >= acked && total <= acked + unanswered,
        "total {total}, acknowledged {acked}, unanswered {unanswered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_wrong_token_is_refused_and_counted() {
    let m = mesh().await;
    let mut rogue = Proc::start(
        &[
            "caller",
            "--gateway-url",
            &m.gateway.mesh_url(),
            "--worker-token",
            "wrong",
            "--name",
            "rogue",
        ],
        false,
    );
    let addr = m.gateway.http();
    common::eventually(
        Duration::from_secs(20),
        "a refusal in the metrics",
        || async move {
            let r = request(addr, "GET", "/metrics", "").await;
            r.text()
                .contains("meshd_workers_refused_total{reason=\"token\"}")
        },
    )
    .await;
    assert!(m.gateway.logs().contains("worker refused"));
    // The gateway counts the refusal before the worker has logged it: wait for its log line.
    rogue
        .wait_for_log("wrong worker token", Duration::from_secs(10))
        .await;
    rogue.kill9();
    assert!(
        rogue.logs().contains("wrong worker token"),
        "{}",
        rogue.logs()
    );
    // The refused worker registered nothing.
    let status = request(addr, "GET", "/status", "").await.json();
    let names: Vec<String> = status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| {
            f["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["name"].as_str().unwrap().to_string())
        })
        .collect();
    assert!(!names.contains(&"rogue".to_string()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_infer_worker_fails_calls_fast_and_its_return_heals() {
    let mut m = mesh().await;
    let addr = m.gateway.http();
    let slow = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (slow, failures, stop) = (slow.clone(), failures.clone(), stop.clone());
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = add(&mut c, 1, 1).await.unwrap();
                    if r.status != 200 {
                        assert!(r.status >= 500, "{}", r.text());
                        assert!(r.json()["error"]["message"].is_string());
                        failures.fetch_add(1, Ordering::Relaxed);
                        // "At once" against a 300 s deadline, with room for a busy CI machine.
                        if t.elapsed() > Duration::from_secs(3) {
                            slow.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.infer.kill9();
    common::eventually(Duration::from_secs(10), "clients see the failure", || {
        let f = failures.clone();
        async move { f.load(Ordering::Relaxed) > 0 }
    })
    .await;
    m.infer = echo_infer(&m.gateway.mesh_url(), "infer-2", &[]);
    ready(addr).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        slow.load(Ordering::Relaxed),
        0,
        "a failure took more than 3 s"
    );
    let mut c = Client::connect(addr).await.unwrap();
    assert_eq!(add(&mut c, 1, 1).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_across_two_infer_workers() {
    let m = mesh().await;
    let _second = echo_infer(&m.gateway.mesh_url(), "infer-b", &[]);
    let addr = m.gateway.http();
    common::eventually(
        Duration::from_secs(30),
        "two math::add workers",
        || async move {
            let s = request(addr, "GET", "/status", "").await.json();
            s["functions"].as_array().unwrap().iter().any(|f| {
                f["function"] == "math::add" && f["workers"].as_array().unwrap().len() == 2
            })
        },
    )
    .await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                for _ in 0..25 {
                    assert_eq!(add(&mut c, 1, 0).await.unwrap().status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // `meshd status` prints the same view as a table.
    let out = std::process::Command::new(bin())
        .args(["status", "--url", &format!("http://{addr}")])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("math::add "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("infer#") && row.contains("infer-b#"),
        "{table}"
    );
    let s = request(addr, "GET", "/status", "").await.json();
    let f = s["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "math::add")
        .unwrap();
    let served: Vec<u64> = f["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 100, "{s}");
    assert!(served.iter().all(|n| *n >= 20), "uneven spread: {served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_passes_the_same_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = up(dir.path(), &[]);
    let addr = up.http();
    ready(addr).await;
    let mut c = Client::connect(addr).await.unwrap();
    let r = add(&mut c, 100, 200).await.unwrap();
    assert_eq!(
        r.json(),
        json!({"c": 300, "running_total": 300, "success": SUCCESS})
    );
    let r = add(&mut c, 50, 50).await.unwrap();
    assert_eq!(
        r.json(),
        json!({"c": 100, "running_total": 400, "success": SUCCESS})
    );
    let r = request(
        addr,
        "POST",
        "/math/add-two-numbers",
        r#"{"a": true, "b": 1}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    drop(c);
    assert!(up.terminate().success(), "{}", up.logs());
    let mut up = common::up(dir.path(), &[]);
    ready(up.http()).await;
    assert_eq!(total(up.http()).await, 400);
    assert!(up.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_worker_is_a_503_naming_the_function() {
    let mut m = mesh().await;
    m.infer.kill9();
    let addr = m.gateway.http();
    common::eventually(Duration::from_secs(10), "readyz 503", || async move {
        request(addr, "GET", "/readyz", "").await.status == 503
    })
    .await;
    let r = request(addr, "POST", "/math/add-two-numbers", r#"{"a": 1, "b": 2}"#).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("math::add"));
    assert_eq!(r.headers["retry-after"], "1");
}

/// Workers of `function` with their in-flight counts, from `/status`.
async fn inflight(addr: std::net::SocketAddr, function: &str) -> Vec<(String, u64)> {
    status_workers(addr, function)
        .await
        .into_iter()
        .map(|w| (w.name, w.inflight))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_generations_move_to_the_surviving_worker() {
    let dir = tempfile::tempdir().unwrap();
    // Identical prompts share an affinity key: a slack of 0 spreads them by load alone.
    let gw = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--affinity-slack", "0"],
    );
    let url = gw.mesh_url();
    let _caller = caller(&url, "caller");
    let mut a = echo_infer(&url, "infer-a", &["--slots", "1"]);
    let _b = echo_infer(&url, "infer-b", &["--slots", "1"]);
    let addr = gw.http();
    common::eventually(
        Duration::from_secs(60),
        "two inference workers",
        || async move { inflight(addr, "inference::run_inference").await.len() == 2 },
    )
    .await;
    ready(addr).await;
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}).to_string();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = request(addr, "POST", "/v1/completions", &body).await;
                (r.status, r.text(), t.elapsed())
            })
        })
        .collect();
    // Wait until infer-a holds one generating request and at least one queued behind it.
    common::eventually(
        Duration::from_secs(20),
        "work queued on infer-a",
        || async move {
            inflight(addr, "inference::run_inference")
                .await
                .iter()
                .any(|(name, n)| name == "infer-a" && *n >= 2)
        },
    )
    .await;
    a.kill9();
    let mut failed = Vec::new();
    for t in tasks {
        let (status, text, _) = t.await.unwrap();
        if status != 200 {
            failed.push((status, text));
        }
    }
    // Only the generation already running on infer-a may fail, and clearly; the queued ones moved.
    assert!(failed.len() <= 1, "{failed:?}");
    for (status, text) in &failed {
        assert_eq!(*status, 502, "{text}");
        assert!(text.contains("worker_lost"), "{text}");
    }
    assert!(
        gw.logs().contains("moved invocations it had not started"),
        "nothing was re-sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_infer_worker_finishes_its_work_and_gets_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let url = gw.mesh_url();
    let _caller = caller(&url, "caller");
    let mut a = echo_infer(&url, "infer-a", &["--slots", "2"]);
    let addr = gw.http();
    ready(addr).await;
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}).to_string();
    let running = {
        let body = body.clone();
        tokio::spawn(async move { request(addr, "POST", "/v1/completions", &body).await })
    };
    common::eventually(
        Duration::from_secs(20),
        "a generation running",
        || async move {
            inflight(addr, "inference::run_inference")
                .await
                .iter()
                .any(|(_, n)| *n >= 1)
        },
    )
    .await;
    a.signal(libc::SIGTERM);
    // The gateway marks it draining (while its generation still runs)...
    let draining = || async move {
        status_workers(addr, "inference::run_inference")
            .await
            .into_iter()
            .find(|w| w.name == "infer-a" && w.draining)
            .map(|w| w.served)
    };
    common::eventually(Duration::from_secs(10), "infer-a draining", || async move {
        draining().await.is_some()
    })
    .await;
    let served = draining().await.expect("still connected while it drains");
    // ...and from then on routes nothing to it: with no other worker, a clear 503 at once.
    let r = request(addr, "POST", "/v1/completions", &body).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("inference::run_inference"),
        "{}",
        r.text()
    );
    assert_eq!(
        draining().await,
        Some(served),
        "a request reached the draining worker"
    );
    let r = running.await.unwrap();
    assert_eq!(
        r.status,
        200,
        "the running generation finishes: {}\ninfer: {}\ngateway: {}",
        r.text(),
        a.logs(),
        gw.logs()
    );
    let status = a.child.wait().unwrap();
    assert!(
        status.success(),
        "infer exits 0 after draining: {}",
        a.logs()
    );
}
