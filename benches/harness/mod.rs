//! Shared pieces of the load harnesses: a `meshd up` child process, a keep-alive HTTP/1 client,
//! and latency statistics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tests' helpers: processes on loopback (meshd roles, redis-server, haproxy), the client.
#[path = "../../tests/common/mod.rs"]
pub mod common;
pub use common::Client;
#[allow(unused_imports)]
pub use common::LlamaServer;

/// The model the harnesses load: `MESHD_BENCH_MODEL`, else the offline test model.
pub fn model() -> String {
    let p = std::env::var("MESHD_BENCH_MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/gemma3-270m-q4_k_m.gguf"
        )
        .to_string()
    });
    assert!(
        std::path::Path::new(&p).is_file(),
        "{p} is missing: run scripts/fetch-model first"
    );
    p
}

/// `meshd up` on a free port, killed on drop.
pub struct Up {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Up {
    pub fn start(extra: &[&str]) -> Up {
        Up::start_env(extra, &[])
    }

    /// [`Up::start`] with extra environment variables.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let model = model();
        let mut args = vec![
            "up",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--model",
            &model,
        ];
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshd"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Up {
            child,
            addr,
            _dir: dir,
        }
    }

    pub async fn ready(&self) {
        for _ in 0..600 {
            if let Ok(mut c) = Client::connect(self.addr).await {
                if c.get("/readyz").await.is_ok_and(|r| r.status == 200) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("meshd up never became ready");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed chat completion: its time to the first content, its whole time, its SSE text.
pub struct Streamed {
    pub ttft: std::time::Duration,
    pub total: std::time::Duration,
    pub raw: String,
}

/// POSTs a streaming `/v1/chat/completions` on a fresh connection (llama-server closes idle
/// keep-alive ones) and reads it to the end; panics with the body on any status but 200.
pub async fn stream_chat(addr: SocketAddr, body: &str) -> Streamed {
    use http_body_util::BodyExt;
    let mut conn = Client::connect(addr).await.unwrap();
    let t = std::time::Instant::now();
    let resp = conn
        .start("POST", "/v1/chat/completions", body.as_bytes(), &[])
        .await
        .unwrap();
    let status = resp.status();
    let mut stream = resp.into_body();
    if status != 200 {
        let body = stream
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        panic!("{addr}: {status}: {}", String::from_utf8_lossy(&body));
    }
    let (mut first, mut raw) = (None, String::new());
    while let Some(frame) = stream.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            let chunk = String::from_utf8_lossy(&data);
            if first.is_none()
                && chunk.contains("\"content\":\"")
                && !chunk.contains("\"content\":\"\"")
            {
                first = Some(t.elapsed());
            }
            raw.push_str(&chunk);
        }
    }
    let total = t.elapsed();
    Streamed {
        ttft: first.unwrap_or(total),
        total,
        raw,
    }
}

/// The q-th quantile (0..=1) of sorted durations, in milliseconds.
pub fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// One load point: requests per second, latency quantiles, failed requests.
pub struct Point {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub errors: usize,
}

/// `conc` keep-alive clients sending `body` to `path` for `secs` seconds.
pub async fn drive(
    addr: SocketAddr,
    path: &'static str,
    body: &'static [u8],
    conc: usize,
    secs: f64,
) -> Point {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                let (mut lat, mut errors) = (Vec::new(), 0);
                while Instant::now() < end {
                    let t = Instant::now();
                    match c.send("POST", path, body, &[]).await {
                        Ok(r) if r.status == 200 => lat.push(t.elapsed()),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    lat.sort();
    Point {
        rps: lat.len() as f64 / secs,
        p50: quantile_ms(&lat, 0.5),
        p99: quantile_ms(&lat, 0.99),
        errors,
    }
}
