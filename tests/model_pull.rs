//! `meshd model pull` against a real HTTP server on loopback (written here, so the test can
//! throttle it and see the `Range` requests): progress output, a verified file and nothing else,
//! a killed download resumed where it stopped, and a wrong hash that leaves nothing behind.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A file server for one file: honours `Range: bytes=N-` (206), sends 64 KiB chunks with
/// `delay` between them, and records the start of every request it served.
struct FileServer {
    addr: std::net::SocketAddr,
    starts: Arc<Mutex<Vec<u64>>>,
    delay: Arc<Mutex<Duration>>,
}

impl FileServer {
    async fn start(body: Vec<u8>) -> FileServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let body = Arc::new(body);
        let (s, d) = (starts.clone(), delay.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (body, starts, delay) = (body.clone(), s.clone(), d.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let from = head
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|r| r.trim_end_matches('-').parse::<u64>().ok());
                    let start = from.unwrap_or(0).min(body.len() as u64) as usize;
                    starts.lock().unwrap().push(start as u64);
                    let status = if from.is_some() {
                        format!(
                            "206 Partial Content\r\ncontent-range: bytes {start}-{}/{}",
                            body.len() - 1,
                            body.len()
                        )
                    } else {
                        "200 OK".to_string()
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len() - start
                    );
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    for chunk in body[start..].chunks(64 << 10) {
                        let wait = *delay.lock().unwrap();
                        tokio::time::sleep(wait).await;
                        if sock.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FileServer {
            addr,
            starts,
            delay,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/models/test.gguf", self.addr)
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn body() -> Vec<u8> {
    (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn pull(args: &[&str]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args(["model", "pull"]).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_shows_progress_and_lands_only_a_verified_file() {
    let body = body();
    let server = FileServer::start(body.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let hash = sha256(&body);
    let o = run(pull(&[&server.url(), "--sha256", &hash, "--out", out])).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("/ 3.0 MiB") && err.contains("100%"), "{err}");
    assert!(err.contains("MiB/s") && err.contains("ETA"), "{err}");
    assert_eq!(files(dir.path()), ["test.gguf"]);
    assert_eq!(std::fs::read(dir.path().join("test.gguf")).unwrap(), body);
    // A second pull finds the file in place and downloads nothing.
    let o = run(pull(&[&server.url(), "--sha256", &hash, "--out", out])).await;
    assert!(String::from_utf8_lossy(&o.stderr).contains("in place"));
    assert_eq!(server.starts.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pull_resumes_where_it_stopped() {
    let body = body();
    let server = FileServer::start(body.clone()).await;
    *server.delay.lock().unwrap() = Duration::from_millis(40);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let hash = sha256(&body);
    let mut first = pull(&[&server.url(), "--sha256", &hash, "--out", out])
        .spawn()
        .unwrap();
    let partial = dir.path().join("test.gguf.partial");
    common::eventually(Duration::from_secs(20), "half a MiB on disk", || {
        let p = partial.clone();
        async move { std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) >= 512 << 10 }
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(
        kept < body.len() as u64,
        "the kill came too late to test a resume"
    );
    assert!(
        !dir.path().join("test.gguf").exists(),
        "no file before its hash is checked"
    );

    *server.delay.lock().unwrap() = Duration::ZERO;
    let o = run(pull(&[&server.url(), "--sha256", &hash, "--out", out])).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming at"), "{err}");
    let starts = server.starts.lock().unwrap().clone();
    assert_eq!(
        starts,
        [0, kept],
        "the second request starts where the first stopped"
    );
    assert_eq!(std::fs::read(dir.path().join("test.gguf")).unwrap(), body);
    assert_eq!(files(dir.path()), ["test.gguf"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hash_or_an_unknown_name_keeps_nothing() {
    let server = FileServer::start(body()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let wrong = "0".repeat(64);
    let o = run(pull(&[&server.url(), "--sha256", &wrong, "--out", out])).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("sha256 mismatch") && err.contains("nothing was kept"),
        "{err}"
    );
    assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));

    let o = run(pull(&[&server.url(), "--out", out])).await;
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs --sha256"));
    let o = run(pull(&["no-such-model", "--out", out])).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("gemma3-270m") && err.contains("smollm2-135m"),
        "{err}"
    );
    assert!(files(dir.path()).is_empty());
}
