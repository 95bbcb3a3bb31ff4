//! Liveness end to end: a hung worker process (SIGSTOP) is found by heartbeats in seconds, a
//! machine with every core busy declares nobody dead, an engine that stops stepping leaves
//! routing while its process lives, and systemd hears READY=1 only once a worker has joined and
//! WATCHDOG=1 only while its engine moves. Real processes, real sockets, the real model.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A generation long enough to be in flight when a fault hits.
fn completion(max_tokens: u32) -> String {
    json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}).to_string()
}

/// `n` generations at once; each one's status, body and how long after the start it was answered,
/// sorted by status.
async fn completions_at_once(
    addr: std::net::SocketAddr,
    n: usize,
    max_tokens: u32,
) -> Vec<(u16, String, Duration)> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let r = request(addr, "POST", "/v1/completions", &completion(max_tokens)).await;
                (r.status, r.text(), t0.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out.sort_by_key(|r| r.0);
    out
}

async fn wait_for_workers(addr: std::net::SocketAddr, function: &str, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    eventually(Duration::from_secs(60), "workers registered", || {
        let names = names.clone();
        async move {
            let have: Vec<String> = status_workers(addr, function)
                .await
                .into_iter()
                .map(|w| w.name)
                .collect();
            names.iter().all(|n| have.contains(n))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_infer_worker_is_declared_dead_within_seconds_and_rejoins_after_sigcont() {
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
    let a = echo_infer(&url, "infer-a", &["--slots", "2"]);
    let _b = echo_infer(&url, "infer-b", &["--slots", "2"]);
    let addr = gw.http();
    wait_for_workers(addr, "inference::run_inference", &["infer-a", "infer-b"]).await;
    ready(addr).await;

    // Load: math clients all along, and four generations, two on each worker.
    let stopped_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let math: Vec<_> = (0..2)
        .map(|_| {
            let (stop, late, stopped_at) = (stop.clone(), late.clone(), stopped_at.clone());
            tokio::spawn(async move {
                let mut answered = 0;
                let mut c = Client::connect(addr).await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = add(&mut c, 1, 1).await.unwrap();
                    assert!(
                        r.status == 200 || r.status == 502,
                        "{} {}",
                        r.status,
                        r.text()
                    );
                    // Nothing waits for a dead worker's idle timeout: every answer comes within
                    // 6 s of the stop (or of its own start, if that was later).
                    let since_stop = stopped_at.lock().unwrap().map(|s| s.max(t).elapsed());
                    if since_stop.is_some_and(|e| e > Duration::from_secs(6)) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let generations: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let r = request(addr, "POST", "/v1/completions", &completion(96)).await;
                (r.status, r.text(), Instant::now())
            })
        })
        .collect();
    // Generating, not only routed: an invocation the engine has not started yet would (rightly)
    // move to the other worker instead of failing.
    eventually(
        Duration::from_secs(30),
        "generating on both workers",
        || async move {
            let m = request(addr, "GET", "/metrics", "").await.text();
            ["infer-a", "infer-b"].iter().all(|w| {
                let prefix = format!("meshd_active_sequences{{worker=\"{w}\"}} ");
                m.lines()
                    .filter_map(|l| l.strip_prefix(&prefix))
                    .any(|n| n.parse::<u64>().is_ok_and(|n| n >= 1))
            })
        },
    )
    .await;
    a.signal(libc::SIGSTOP);
    let stop_time = Instant::now();
    *stopped_at.lock().unwrap() = Some(stop_time);

    let mut lost = 0;
    for g in generations {
        let (status, text, at) = g.await.unwrap();
        match status {
            200 => {}
            502 => {
                lost += 1;
                assert!(
                    text.contains("worker_lost") && text.contains("infer-a"),
                    "{text}"
                );
                let after = at.duration_since(stop_time);
                println!("a generation on the stopped worker failed {after:?} after the stop");
                assert!(
                    after <= Duration::from_secs(6),
                    "the 502 came {after:?} after the stop"
                );
            }
            other => panic!("{other}: {text}"),
        }
    }
    assert!(
        lost >= 1,
        "no generation was in flight on the stopped worker"
    );
    assert!(
        gw.wait_for_log("worker declared dead", Duration::from_secs(1))
            .await,
        "{}",
        gw.logs()
    );

    // Revived, it finds its connection gone, rejoins and takes work again.
    a.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(30),
        "infer-a serves again",
        || async move {
            let mut c = Client::connect(addr).await.unwrap();
            for _ in 0..4 {
                assert_eq!(add(&mut c, 1, 1).await.unwrap().status, 200);
            }
            status_workers(addr, "math::add")
                .await
                .iter()
                .any(|w| w.name == "infer-a" && w.served > 0)
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for m in math {
        assert!(m.await.unwrap() > 0, "a math client got no answer at all");
    }
    assert_eq!(
        late.load(Ordering::Relaxed),
        0,
        "a math request waited more than 6 s after the stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_core_busy_no_worker_is_declared_dead() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let url = gw.mesh_url();
    let caller = caller(&url, "caller");
    let infer = infer_with(&url, "infer", &["--slots", "8", "--threads", "2"]);
    let addr = gw.http();
    ready(addr).await;

    // Two spinning threads beside eight generations sharing two cores.
    let burning = Arc::new(AtomicBool::new(true));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let burning = burning.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while burning.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let statuses = completions_at_once(addr, 8, 96).await;
    burning.store(false, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    for (status, text, _) in &statuses {
        assert_eq!(*status, 200, "{text}");
    }
    for (who, logs) in [
        ("gateway", gw.logs()),
        ("caller", caller.logs()),
        ("infer", infer.logs()),
    ] {
        for bad in [
            "declared dead",
            "lost the gateway",
            "went silent",
            "engine stalled",
        ] {
            assert!(!logs.contains(bad), "{who} logged `{bad}`:\n{logs}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_engine_takes_its_worker_out_of_routing_while_the_process_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let stall_file = dir.path().join("stall");
    // A regression shows as a 504 after 30 s rather than after the default 300 s.
    let gw = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--request-timeout-secs", "30"],
    );
    let url = gw.mesh_url();
    let _caller = caller(&url, "caller");
    let stall_env = [("MESHD_FAULT_STALL_FILE", stall_file.to_str().unwrap())];
    let stall_flags = ["--slots", "2", "--threads", "1", "--engine-stall-secs", "2"];
    let mut a = infer_env(&url, "infer-a", &stall_flags, &stall_env);
    let addr = gw.http();
    wait_for_workers(addr, "inference::run_inference", &["infer-a"]).await;
    ready(addr).await;

    // infer-a, the only worker, takes a generation and its engine blocks before the next step;
    // infer-b joins meanwhile.
    std::fs::write(&stall_file, b"").unwrap();
    let stuck = tokio::spawn(completions_at_once(addr, 1, 16));
    let _b = infer_with(&url, "infer-b", &["--slots", "2", "--threads", "1"]);
    let results = stuck.await.unwrap();
    let (status, text, after) = &results[0];
    assert_eq!(*status, 502, "{text}");
    assert!(
        text.contains("infer-a") && text.contains("stalled"),
        "{text}"
    );
    // The progress deadline (2 s) plus a heartbeat or two: not a request timeout.
    assert!(
        *after < Duration::from_secs(6),
        "failed only after {after:?}"
    );

    let r = request(addr, "GET", "/readyz", "").await.json();
    assert_eq!(r["stalled_workers"], json!(["infer-a"]), "{r}");
    wait_for_workers(addr, "inference::run_inference", &["infer-a", "infer-b"]).await;
    let served_before = status_workers(addr, "inference::run_inference").await;
    let a_before = served_before.iter().find(|w| w.name == "infer-a").unwrap();
    assert!(a_before.stalled, "/status shows infer-a stalled");
    for _ in 0..3 {
        let r = request(addr, "POST", "/v1/completions", &completion(4)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let a_after = status_workers(addr, "inference::run_inference").await;
    let a_after = a_after.iter().find(|w| w.name == "infer-a").unwrap();
    assert_eq!(
        a_after.served, a_before.served,
        "nothing new was routed to the stalled worker"
    );
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the process stays up"
    );

    // Unblocked, it steps again and is back in routing.
    std::fs::remove_file(&stall_file).unwrap();
    eventually(Duration::from_secs(10), "infer-a recovers", || async move {
        let w = status_workers(addr, "inference::run_inference").await;
        w.iter().any(|w| w.name == "infer-a" && !w.stalled)
    })
    .await;
    let r = request(addr, "GET", "/readyz", "").await.json();
    assert_eq!(r["stalled_workers"], json!([]), "{r}");
}

/// Datagrams sent to a notify socket the test owns.
struct NotifySocket {
    sock: tokio::net::UnixDatagram,
    path: String,
}

impl NotifySocket {
    fn bind(dir: &Path, name: &str) -> NotifySocket {
        let path = dir.join(name);
        NotifySocket {
            sock: tokio::net::UnixDatagram::bind(&path).unwrap(),
            path: path.to_str().unwrap().to_string(),
        }
    }

    /// The next datagram within `limit`, if any.
    async fn next(&self, limit: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(limit, self.sock.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits up to `limit` for a datagram holding `needle`; returns every one seen until then.
    async fn until(&self, needle: &str, limit: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(msg) = self.next(left).await else {
                break;
            };
            let found = msg.contains(needle);
            seen.push(msg);
            if found {
                return (true, seen);
            }
        }
        (false, seen)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_after_registration_and_no_watchdog_while_the_engine_is_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let gw_notify = NotifySocket::bind(dir.path(), "gateway.sock");
    let gw = gateway_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--request-timeout-secs", "30"],
        &[("NOTIFY_SOCKET", &gw_notify.path)],
    );
    let (ready_seen, seen) = gw_notify.until("READY=1", Duration::from_secs(10)).await;
    assert!(ready_seen, "the gateway never said READY=1: {seen:?}");
    let url = gw.mesh_url();
    let addr = gw.http();
    let _caller = caller(&url, "caller");

    // A worker the gateway refuses never says READY=1, though it does say why it waits.
    let refused_notify = NotifySocket::bind(dir.path(), "refused.sock");
    let _refused = Proc::start_env(
        &[
            "caller",
            "--gateway-url",
            &url,
            "--worker-token",
            "not-the-token",
            "--name",
            "refused",
        ],
        false,
        &[("NOTIFY_SOCKET", &refused_notify.path)],
    );
    let (ready_seen, seen) = refused_notify
        .until("READY=1", Duration::from_secs(4))
        .await;
    assert!(!ready_seen, "a refused worker said READY=1: {seen:?}");
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=cannot join the mesh")),
        "{seen:?}"
    );

    // The infer worker: READY=1 once it has joined; then WATCHDOG=1 twice a second.
    let notify = NotifySocket::bind(dir.path(), "infer.sock");
    let stall_file = dir.path().join("stall");
    let _infer = infer_env(
        &url,
        "infer",
        &["--slots", "2", "--engine-stall-secs", "2"],
        &[
            ("NOTIFY_SOCKET", &notify.path),
            ("WATCHDOG_USEC", "1000000"),
            ("MESHD_FAULT_STALL_FILE", stall_file.to_str().unwrap()),
        ],
    );
    let (ready_seen, seen) = notify.until("READY=1", Duration::from_secs(60)).await;
    assert!(ready_seen, "infer never said READY=1: {seen:?}");
    ready(addr).await;
    let (fed, seen) = notify.until("WATCHDOG=1", Duration::from_secs(3)).await;
    assert!(fed, "no WATCHDOG=1 after READY=1: {seen:?}");

    // A stall: once the engine has held work for 2 s without a step, the feeding stops.
    std::fs::write(&stall_file, b"").unwrap();
    let stuck =
        tokio::spawn(async move { request(addr, "POST", "/v1/completions", &completion(8)).await });
    let (stalled, seen) = notify
        .until("STATUS=engine stalled", Duration::from_secs(10))
        .await;
    assert!(stalled, "no stall reported: {seen:?}");
    // One feeding may have been on its way; none after it, over two watchdog periods.
    let quiet_from = Instant::now() + Duration::from_millis(600);
    let mut fed_while_stalled = Vec::new();
    while let Some(left) =
        (quiet_from + Duration::from_secs(2)).checked_duration_since(Instant::now())
    {
        if let Some(msg) = notify.next(left).await {
            if msg.contains("WATCHDOG=1") && Instant::now() > quiet_from {
                fed_while_stalled.push(msg);
            }
        }
    }
    assert!(
        fed_while_stalled.is_empty(),
        "the watchdog was fed while the engine was stalled"
    );
    let r = stuck.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());

    // Unblocked: progress again, and the feeding resumes.
    std::fs::remove_file(&stall_file).unwrap();
    let (fed, seen) = notify.until("WATCHDOG=1", Duration::from_secs(10)).await;
    assert!(fed, "the watchdog was not fed again: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_readiness_runs_the_whole_chain_behind_the_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "health-key\n").unwrap();
    let gw = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--api-keys-file", keys.to_str().unwrap()],
    );
    let url = gw.mesh_url();
    let _caller = caller(&url, "caller");
    let mut infer = infer(&url, "infer");
    let addr = gw.http();
    ready(addr).await;
    let deep = |key: &'static str| async move {
        let mut c = Client::connect(addr).await.unwrap();
        let auth = format!("Bearer {key}");
        c.send("GET", "/readyz?deep=1", b"", &[("authorization", &auth)])
            .await
            .unwrap()
    };
    // Open /readyz stays open; the deep one costs real work, so it needs a key.
    assert_eq!(request(addr, "GET", "/readyz", "").await.status, 200);
    assert_eq!(request(addr, "GET", "/readyz?deep=1", "").await.status, 401);
    assert_eq!(deep("wrong").await.status, 401);
    let add = |body: &'static [u8]| async move {
        let mut c = Client::connect(addr).await.unwrap();
        let auth = [("authorization", "Bearer health-key")];
        let r = c.send("POST", "/math/add-two-numbers", body, &auth).await;
        r.unwrap().json()["running_total"].as_i64().unwrap()
    };
    let total_before = add(br#"{"a":5,"b":6}"#).await;
    let r = deep("health-key").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["checks"]["math"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["generate"]["ok"], true, "{body}");
    // The check adds zero: the running total is what it was.
    assert_eq!(add(br#"{"a":0,"b":0}"#).await, total_before);

    // Without the infer worker, the chain is broken: 503, naming what failed, within the deadline.
    infer.kill9();
    let t = Instant::now();
    let r = deep("health-key").await;
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["checks"]["math"]["ok"], false, "{body}");
    assert_eq!(body["checks"]["generate"]["ok"], false, "{body}");
    assert!(
        body["checks"]["generate"]["error"]
            .as_str()
            .unwrap()
            .contains("inference::run_inference"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(11), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_takes_its_worker_out_and_the_next_request_goes_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let url = gw.mesh_url();
    let _caller = caller(&url, "caller");
    let flags = ["--slots", "2", "--threads", "1"];
    let mut a = infer_env(
        &url,
        "infer-a",
        &flags,
        &[("MESHD_FAULT_STALL_FILE", fault.to_str().unwrap())],
    );
    let addr = gw.http();
    wait_for_workers(addr, "inference::run_inference", &["infer-a"]).await;
    ready(addr).await;

    // infer-a, the only worker, takes a generation and its engine thread dies at the next step;
    // infer-b joins meanwhile.
    std::fs::write(&fault, b"die").unwrap();
    let dying = tokio::spawn(completions_at_once(addr, 1, 8));
    let _b = infer_with(&url, "infer-b", &flags);
    let statuses = dying.await.unwrap();
    assert!(statuses[0].0 >= 500, "{statuses:?}");

    // The worker does not stay registered answering errors: it exits non-zero for systemd.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "infer-a is still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{status:?}");
    assert!(
        a.logs().contains("inference engine thread has stopped"),
        "{}",
        a.logs()
    );
    wait_for_workers(addr, "inference::run_inference", &["infer-b"]).await;
    for _ in 0..3 {
        let r = request(addr, "POST", "/v1/completions", &completion(4)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let names: Vec<String> = status_workers(addr, "inference::run_inference")
        .await
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["infer-b"]);
}
