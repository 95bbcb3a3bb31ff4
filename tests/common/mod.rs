//! Shared helpers for the end-to-end tests: real `meshd` processes on loopback (ports bound by
//! the processes and read back from their first stdout line), and a small HTTP client.
#![allow(dead_code)]

mod http;
mod llama_server;
mod peer;
mod services;
pub use http::{Client, Resp};
#[allow(unused_imports)]
pub use llama_server::LlamaServer;
#[allow(unused_imports)]
pub use peer::Peer;
#[allow(unused_imports)]
pub use services::{free_port, Haproxy, Redis, RedisCluster};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-mesh-token-0123456789";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshd")
}

/// The offline model, fetched by `scripts/fetch-model`.
pub fn model() -> PathBuf {
    model_file("gemma3-270m-q4_k_m.gguf", "scripts/fetch-model")
}

fn model_file(name: &str, fetch: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run {fetch} first",
        path.display()
    );
    path
}

/// The second offline model (a different architecture and quantisation), fetched by
/// `scripts/fetch-model smollm2`.
pub fn second_model() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model smollm2 first",
        path.display()
    );
    path
}

/// A `meshd` child process, killed (SIGKILL) when dropped, and by the kernel if the test dies.
pub struct Proc {
    pub child: Child,
    pub http: Option<SocketAddr>,
    pub mesh: Option<SocketAddr>,
    pub log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Starts `meshd ARGS`; for a listening role, waits for and parses its address line.
    pub fn start(args: &[&str], listens: bool) -> Proc {
        Proc::start_env(args, listens, &[])
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_env(args: &[&str], listens: bool, env: &[(&str, &str)]) -> Proc {
        Proc::start_wrapped(&[], args, listens, env)
    }

    /// `WRAPPER… meshd ARGS` (say, `unshare -m …`): the wrapper must end by exec'ing meshd.
    pub fn start_wrapped(
        wrapper: &[&str],
        args: &[&str],
        listens: bool,
        env: &[(&str, &str)],
    ) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .env(
                "RUST_LOG",
                std::env::var("MESHD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied());
        // Die with the thread that started it (and so with the test), whatever happens to it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn meshd");
        let (mut http, mut mesh) = (None, None);
        if listens {
            let stdout = child.stdout.take().unwrap();
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            if line.is_empty() {
                let _ = child.wait();
                panic!(
                    "meshd {args:?} exited before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            for part in line.split_whitespace() {
                if let Some(a) = part.strip_prefix("http=") {
                    http = Some(a.parse().unwrap());
                }
                if let Some(a) = part.strip_prefix("mesh=") {
                    mesh = Some(a.parse().unwrap());
                }
            }
        }
        Proc {
            child,
            http,
            mesh,
            log,
            _dir: Some(dir),
        }
    }

    pub fn http(&self) -> SocketAddr {
        self.http.expect("a listening role")
    }

    pub fn mesh_url(&self) -> String {
        format!("ws://{}", self.mesh.expect("a listening role"))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the process's log holds `needle`; answers whether it did.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (such as `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// SIGTERM, then waits for the exit status (bounded).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
            .expect("meshd did not exit after SIGTERM")
    }

    /// The exit status, once the process ends within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn gateway(data_dir: &Path, http: &str, mesh: &str) -> Proc {
    gateway_with(data_dir, http, mesh, &[])
}

pub fn gateway_with(data_dir: &Path, http: &str, mesh: &str, extra: &[&str]) -> Proc {
    gateway_env(data_dir, http, mesh, extra, &[])
}

/// A gateway with extra flags and environment variables.
pub fn gateway_env(
    data_dir: &Path,
    http: &str,
    mesh: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut args = vec![
        "gateway",
        "--http-addr",
        http,
        "--mesh-addr",
        mesh,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--worker-token",
        TOKEN,
    ];
    args.extend_from_slice(extra);
    Proc::start_env(&args, true, env)
}

pub fn caller(url: &str, name: &str) -> Proc {
    Proc::start(
        &[
            "caller",
            "--gateway-url",
            url,
            "--worker-token",
            TOKEN,
            "--name",
            name,
        ],
        false,
    )
}

pub fn infer(url: &str, name: &str) -> Proc {
    infer_with(url, name, &["--slots", "4"])
}

/// An infer worker whose generator is the echo stand-in (no model loaded): for tests of the mesh
/// that do not test inference.
pub fn echo_infer(url: &str, name: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--generator", "echo"];
    if !extra.contains(&"--slots") {
        args.extend_from_slice(&["--slots", "4"]);
    }
    args.extend_from_slice(extra);
    infer_env(url, name, &args, &[])
}

pub fn infer_with(url: &str, name: &str, extra: &[&str]) -> Proc {
    infer_env(url, name, extra, &[])
}

/// An infer worker with extra flags and environment variables.
pub fn infer_env(url: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let model = model();
    let mut args = vec![
        "infer",
        "--gateway-url",
        url,
        "--worker-token",
        TOKEN,
        "--name",
        name,
        "--model",
        model.to_str().unwrap(),
    ];
    if !extra.contains(&"--threads") {
        args.extend_from_slice(&["--threads", "2"]);
    }
    args.extend_from_slice(extra);
    Proc::start_env(&args, false, env)
}

pub fn up(data_dir: &Path, extra: &[&str]) -> Proc {
    let model = model();
    let mut args = vec![
        "up",
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, true)
}

/// A throwaway PKI in a temp dir: `ca.pem`, `gateway.pem` + `gateway-key.pem` (for 127.0.0.1,
/// signed by the CA), and `other-ca.pem` (an unrelated CA).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let main = ca("meshd test CA");
        let other = ca("somebody else's CA");
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &main)
            .unwrap();
        // The same name signed by the other CA: a rotated certificate.
        let rotated_key = KeyPair::generate().unwrap();
        let rotated = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&rotated_key, &other)
            .unwrap();
        let files = [
            ("ca.pem", main.pem()),
            ("other-ca.pem", other.pem()),
            ("gateway.pem", cert.pem()),
            ("gateway-key.pem", key.serialize_pem()),
            ("rotated.pem", rotated.pem()),
            ("rotated-key.pem", rotated_key.serialize_pem()),
        ];
        for (name, pem) in files {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

/// One request on a fresh connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Resp {
    let mut c = Client::connect(addr).await.expect("connect");
    c.send(method, path, body.as_bytes(), &[])
        .await
        .expect("request")
}

/// Writes raw bytes on a fresh connection and reads what comes back until the server closes or
/// 2 s pass (for requests a well-behaved client cannot send).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    raw_exchange_closed(addr, bytes).await.0
}

/// [`raw_exchange`], and whether the server closed the connection (rather than falling silent).
pub async fn raw_exchange_closed(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut closed = false;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// One worker of a function in the gateway's `/status`.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub name: String,
    pub inflight: u64,
    pub served: u64,
    pub draining: bool,
    pub stalled: bool,
}

/// The workers of `function` in `/status`.
pub async fn status_workers(addr: SocketAddr, function: &str) -> Vec<WorkerRow> {
    let s = request(addr, "GET", "/status", "").await.json();
    s["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["function"] == function)
        .flat_map(|f| f["workers"].as_array().unwrap().clone())
        .map(|w| WorkerRow {
            name: w["name"].as_str().unwrap().to_string(),
            inflight: w["inflight"].as_u64().unwrap(),
            served: w["served"].as_u64().unwrap(),
            draining: w["draining"] == true,
            stalled: w["stalled"] == true,
        })
        .collect()
}

/// Polls `check` every 50 ms until it holds or `limit` passes (then panics with `what`).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `GET /readyz` answers 200.
pub async fn ready(addr: SocketAddr) {
    eventually(Duration::from_secs(60), "readyz 200", || async move {
        match Client::connect(addr).await {
            Ok(mut c) => c
                .get("/readyz")
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false),
            Err(_) => false,
        }
    })
    .await;
}

/// Ready, and the caller's math route bound. A lone gateway is ready once any trigger is served,
/// which may be only the infer worker's `/v1/engine/stats` while the caller is still joining.
pub async fn ready_for_math(gateway: &Proc) {
    ready(gateway.http()).await;
    assert!(
        gateway
            .wait_for_log("path=/math/add-two-numbers", Duration::from_secs(30))
            .await,
        "the caller never bound its route"
    );
}

/// One `POST /math/add-two-numbers` with an `Idempotency-Key`, on a connection of its own: the
/// status and the error code (empty for a success), or `None` when the connection failed.
pub async fn idempotent_add(addr: SocketAddr, body: &str, key: &str) -> Option<(u16, String)> {
    let mut c = Client::connect(addr).await.ok()?;
    let r = c
        .send(
            "POST",
            "/math/add-two-numbers",
            body.as_bytes(),
            &[("idempotency-key", key)],
        )
        .await
        .ok()?;
    // Not always JSON: a load balancer's own 502 is a page.
    let code = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    Some((r.status, code))
}

pub async fn add(client: &mut Client, a: i64, b: i64) -> Result<Resp, String> {
    client
        .post(
            "/math/add-two-numbers",
            &format!(r#"{{"a": {a}, "b": {b}}}"#),
        )
        .await
}

/// The matmul kernel `matmul_kernel = "meshd"` must run on this machine: the AVX-512 VNNI kernel
/// where the CPU has what it needs (checked here apart from the C code's own check), else the
/// prefetching AVX2 tiles; llama.cpp's own where build.rs applies no patch (not x86-64 Linux).
pub fn best_matmul_kernel() -> &'static str {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return "llama.cpp";
    }
    if avx512_vnni() {
        "meshd-avx512"
    } else {
        "meshd-avx2"
    }
}

fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512dq")
            && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
