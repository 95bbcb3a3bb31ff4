//! API keys, TLS on both listeners, and the refusals that keep the defaults safe — over real
//! processes and sockets.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn start_mesh(gateway_args: &[&str], worker_args: &[&str], url_scheme: &str) -> (Proc, Proc, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "gateway",
        "--http-addr",
        "127.0.0.1:0",
        "--mesh-addr",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--worker-token",
        TOKEN,
    ];
    args.extend_from_slice(gateway_args);
    let gateway = Proc::start(&args, true);
    std::mem::forget(dir);
    let url = format!("{url_scheme}://{}", gateway.mesh.unwrap());
    let model = model();
    let mut caller = vec!["caller", "--gateway-url", &url, "--worker-token", TOKEN];
    caller.extend_from_slice(worker_args);
    let mut infer = vec![
        "infer",
        "--gateway-url",
        &url,
        "--worker-token",
        TOKEN,
        "--model",
        model.to_str().unwrap(),
        "--slots",
        "2",
        // Keys and TLS are under test, not inference.
        "--generator",
        "echo",
    ];
    infer.extend_from_slice(worker_args);
    let (c, i) = (Proc::start(&caller, false), Proc::start(&infer, false));
    (gateway, c, i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_everything_but_health() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    let digest: String = meshd::config::sha256(b"key-two")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        keys.path(),
        format!("key-one\nsha256:{digest} # the second\n"),
    )
    .unwrap();
    let (gateway, _c, _i) = start_mesh(
        &["--api-keys-file", keys.path().to_str().unwrap()],
        &[],
        "ws",
    );
    let addr = gateway.http();
    ready_for_math(&gateway).await;
    assert_eq!(request(addr, "GET", "/healthz", "").await.status, 200);

    let body = r#"{"a": 1, "b": 2}"#;
    let r = request(addr, "POST", "/math/add-two-numbers", body).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let e = &r.json()["error"];
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(e["type"], "authentication_error");
    for path in ["/metrics", "/status", "/v1/models"] {
        assert_eq!(request(addr, "GET", path, "").await.status, 401, "{path}");
    }
    let mut c = Client::connect(addr).await.unwrap();
    let with = |k: &'static str| [("authorization", k)];
    let r = c
        .send(
            "POST",
            "/math/add-two-numbers",
            body.as_bytes(),
            &with("Bearer wrong"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Incorrect API key"));
    for key in ["Bearer key-one", "Bearer key-two"] {
        let r = c
            .send("POST", "/math/add-two-numbers", body.as_bytes(), &with(key))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{key}: {}", r.text());
    }
    let r = c
        .send("GET", "/metrics", b"", &with("Bearer key-one"))
        .await
        .unwrap();
    assert!(r.text().contains("status=\"401\""), "{}", r.text());

    // Rotation without a restart: SIGHUP reads the file again.
    let hangup = || gateway.signal(libc::SIGHUP);
    let status_with = |key: &'static str| async move {
        let mut c = Client::connect(addr).await.unwrap();
        let auth = [("authorization", key)];
        let r = c.send("POST", "/math/add-two-numbers", body.as_bytes(), &auth);
        r.await.unwrap().status
    };
    std::fs::write(keys.path(), "key-three\n").unwrap();
    hangup();
    assert!(
        gateway
            .wait_for_log("reloaded the API keys", Duration::from_secs(10))
            .await
    );
    assert_eq!(status_with("Bearer key-one").await, 401, "a retired key");
    assert_eq!(status_with("Bearer key-three").await, 200, "the new key");
    // An empty list would open the API: refused, the keys in force stay.
    std::fs::write(keys.path(), "").unwrap();
    hangup();
    assert!(
        gateway
            .wait_for_log("reload refused", Duration::from_secs(10))
            .await
    );
    assert_eq!(status_with("Bearer key-three").await, 200);
    assert_eq!(status_with("Bearer nothing").await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_protects_the_api_and_the_mesh() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.path("gateway.pem"),
        pki.path("gateway-key.pem"),
        pki.path("ca.pem"),
    );
    let (gateway, _c, _i) = start_mesh(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--mesh-tls-cert",
            &cert,
            "--mesh-tls-key",
            &key,
        ],
        &["--gateway-ca", &ca],
        "wss",
    );
    let addr = gateway.http();
    let ca_path = pki.dir.path().join("ca.pem");
    common::eventually(Duration::from_secs(60), "ready over https", || {
        let ca_path = ca_path.clone();
        async move {
            match Client::connect_tls(addr, &ca_path).await {
                Ok(mut c) => c
                    .get("/readyz")
                    .await
                    .map(|r| r.status == 200)
                    .unwrap_or(false),
                Err(_) => false,
            }
        }
    })
    .await;
    let mut c = Client::connect_tls(addr, &ca_path).await.unwrap();
    let r = add(&mut c, 100, 200).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["c"], 300);

    // Plain HTTP to the TLS port gets no HTTP answer at all (a TLS alert at most).
    let answer = common::raw_exchange(addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!answer.contains("HTTP/"), "{answer}");
    // A client that trusts another CA refuses the gateway.
    assert!(
        Client::connect_tls(addr, &pki.dir.path().join("other-ca.pem"))
            .await
            .is_err()
    );

    // A worker that trusts another CA cannot join, and the gateway counts the failed handshake.
    let other = pki.path("other-ca.pem");
    let url = format!("wss://{}", gateway.mesh.unwrap());
    let mut rogue = caller_trusting(&url, &other, "rogue");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.get("/metrics").await.unwrap();
        if r.text()
            .contains("meshd_workers_refused_total{reason=\"tls\"}")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS refusal in the metrics"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rogue
        .wait_for_log("cannot connect", Duration::from_secs(10))
        .await;
    rogue.kill9();
    assert!(rogue.logs().contains("cannot connect"), "{}", rogue.logs());

    // Certificate rotation without a restart: new files, SIGHUP, and new connections get the new
    // certificate while an open one keeps working.
    std::fs::copy(pki.path("rotated.pem"), &cert).unwrap();
    std::fs::copy(pki.path("rotated-key.pem"), &key).unwrap();
    gateway.signal(libc::SIGHUP);
    assert!(
        gateway
            .wait_for_log(
                "reloaded the API keys and certificates",
                Duration::from_secs(10)
            )
            .await,
        "{}",
        gateway.logs()
    );
    let mut fresh = Client::connect_tls(addr, Path::new(&other)).await.unwrap();
    let r = add(&mut fresh, 1, 2).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        Client::connect_tls(addr, &ca_path).await.is_err(),
        "the retired certificate is still served"
    );
    let r = add(&mut c, 3, 4).await.unwrap();
    assert_eq!(
        r.json()["c"],
        7,
        "the connection opened before the rotation"
    );
    // The mesh listener rotated too: a worker that trusts only the new CA joins now.
    let mut joiner = caller_trusting(&url, &other, "after-rotation");
    let joined = joiner
        .wait_for_log("joined the mesh", Duration::from_secs(20))
        .await;
    joiner.kill9();
    assert!(joined, "{}", joiner.logs());
}

/// A caller that joins the mesh at `url` trusting only the CA in `ca`.
fn caller_trusting(url: &str, ca: &str, name: &str) -> Proc {
    let args = [
        "caller",
        "--gateway-url",
        url,
        "--worker-token",
        TOKEN,
        "--gateway-ca",
        ca,
        "--name",
        name,
    ];
    Proc::start(&args, false)
}

#[test]
fn an_open_or_plaintext_listener_off_loopback_is_refused_at_start() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "k\n").unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(bin())
            .args([
                "gateway",
                "--mesh-addr",
                "127.0.0.1:0",
                "--worker-token",
                "t",
                "--http-addr",
                "0.0.0.0:0",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--allow-plaintext"]);
    assert!(err.contains("without API keys"), "{err}");
    let err = run(&["--api-keys-file", keys.path().to_str().unwrap()]);
    assert!(err.contains("configure TLS"), "{err}");
    let out = Command::new(bin())
        .args([
            "caller",
            "--gateway-url",
            "ws://10.1.2.3:49134",
            "--worker-token",
            "t",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain text"));
}

#[test]
fn config_check_accepts_every_shipped_role_file_and_names_errors() {
    for role in ["gateway", "caller", "infer", "up"] {
        let path = format!("{}/roles/{role}.toml", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(bin())
            .args(["config", "check", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bad = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(bad.path(), "slots = \"many\"\n").unwrap();
    let out = Command::new(bin())
        .args([
            "config",
            "check",
            bad.path().to_str().unwrap(),
            "--role",
            "infer",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("slots"));
}

/// The gateway's peak resident memory so far (`VmHWM`, so a spike freed at once still counts).
fn peak_rss_kib(p: &Proc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_cannot_make_the_gateway_buffer_big_frames() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let url = gw.mesh_url();
    // A Hello with a wrong token and an (almost) 8 MiB field, within the post-auth frame limit:
    // before the token is checked, the gateway reads at most 4 KiB of it.
    #[derive(serde::Serialize)]
    struct Padded {
        r#type: &'static str,
        protocol: u32,
        name: &'static str,
        token: &'static str,
        /// 8 Mi small integers: an array, which a decoder that buffers fields before it knows
        /// the message type blows up to hundreds of MiB.
        pad: Vec<u8>,
    }
    let frame = rmp_serde::to_vec_named(&Padded {
        r#type: "hello",
        protocol: 1,
        name: "attacker",
        token: "wrong",
        pad: vec![7; (8 << 20) - 4096],
    })
    .unwrap();
    let before = peak_rss_kib(&gw);
    let attacks: Vec<_> = (0..4)
        .map(|_| {
            let (url, frame) = (url.clone(), frame.clone());
            tokio::spawn(async move {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(16 << 20))
                    .max_frame_size(Some(16 << 20));
                let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("ws://"))
                    .await
                    .unwrap();
                let (mut ws, _) =
                    tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(config))
                        .await
                        .unwrap();
                // The gateway may close mid-frame: that is the point.
                let _ = ws.send(WsMessage::Binary(frame.into())).await;
                ws
            })
        })
        .collect();
    let mut held = Vec::new();
    for a in attacks {
        held.push(a.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = peak_rss_kib(&gw).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "the gateway's peak memory grew by {grown_mib} MiB for four unauthenticated frames"
    );
    // Each was refused (and counted) as a bad handshake, and a real worker still joins.
    let addr = gw.http();
    eventually(
        Duration::from_secs(10),
        "four refusals counted",
        || async move {
            let m = request(addr, "GET", "/metrics", "").await.text();
            m.contains("meshd_workers_refused_total{reason=\"handshake\"} 4")
        },
    )
    .await;
    let _caller = caller(&url, "caller");
    let _infer = echo_infer(&url, "infer", &[]);
    ready(addr).await;
    drop(held);
}

/// `GET /healthz` on a fresh connection from `from` (another loopback address than the flood's).
async fn healthz_from(from: &str, addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_both_listeners_cannot_starve_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let (http, mesh) = (gw.http(), gw.mesh.unwrap());
    // 4,200 connections that send nothing, half to each listener, all from 127.0.0.1.
    let mut idle = Vec::new();
    for i in 0..4200 {
        let to = if i % 2 == 0 { http } else { mesh };
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(to)).await
        {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 4000, "only {} connections opened", idle.len());
    // Each listener has its own budget and a cap per address: another address is still served,
    // at once.
    let t = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(2), healthz_from("127.0.0.2", http))
        .await
        .expect("/healthz unanswered for 2 s while 4,200 idle sockets were open");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    println!(
        "/healthz answered in {:?} beside 4,200 idle sockets",
        t.elapsed()
    );
    // The flood's own address holds no more than its share of each listener.
    let logs = gw.logs();
    assert!(
        logs.contains("this address already holds 1024 connections")
            && logs.contains("this address already holds 64 connections"),
        "the per-address caps did not act"
    );
    drop(idle);
}

/// How long until the server closes `s` (reading and dropping what it sends), at most `limit`.
async fn closed_within<R>(s: &mut R, limit: Duration) -> Option<Duration>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let t = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_idle_keep_alives_and_slow_bodies_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--http-header-timeout-secs",
            "1",
            "--http-body-timeout-secs",
            "1",
        ],
    );
    let addr = gw.http();
    let _caller = caller(&gw.mesh_url(), "caller");
    eventually(Duration::from_secs(20), "the caller's routes", || async {
        !status_workers(addr, "math::add_two_numbers")
            .await
            .is_empty()
    })
    .await;

    // Slowloris: a header line every 200 ms never completes the head; the deadline counts from
    // the connection's start, whatever arrives.
    let (mut reader, mut writer) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    writer
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let drip = async move {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let line = format!("x-drip-{i}: y\r\n");
            if writer.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    };
    let (_, closed) = tokio::join!(drip, closed_within(&mut reader, Duration::from_secs(5)));
    let closed = closed.expect("a head sent for 5 s was never cut off");
    assert!(closed < Duration::from_secs(3), "cut off after {closed:?}");

    // Keep-alive: one complete request, then silence; the deadline starts again after the
    // response.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = idle.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    let closed = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection was kept for 5 s");
    assert!(closed < Duration::from_secs(3), "cut off after {closed:?}");

    // A body that stops arriving: 408, and the connection is closed.
    let mut body = tokio::net::TcpStream::connect(addr).await.unwrap();
    body.write_all(
        b"POST /math/add-two-numbers HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\n\r\n{\"a\": 1,",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), body.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "a stalled body kept its connection: {answer}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // Meanwhile the gateway answers everyone else.
    assert_eq!(request(addr, "GET", "/healthz", "").await.status, 200);
}
