//! llama.cpp's llama-server on loopback, built by `scripts/llama-server`: the real upstream of the
//! `openai` backend's tests and the side-by-side figure of the benches (which include this file).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::http::Client;

/// llama.cpp's server on a free loopback port, killed on drop.
pub struct LlamaServer {
    child: Child,
    pub addr: SocketAddr,
}

impl LlamaServer {
    pub fn binary() -> Option<String> {
        if let Ok(p) = std::env::var("LLAMA_SERVER") {
            return Some(p);
        }
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/llama-server"))
            .arg("--path")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !path.is_empty()).then_some(path)
    }

    /// Starts `bin` on the offline model with the Gemma template and `args` (its slots and context).
    pub fn start(bin: &str, model: &Path, args: &[&str]) -> LlamaServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args([
                "-m",
                &model.to_string_lossy(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            // The Gemma template (the base GGUF carries none; `--no-jinja` selects the built-in
            // one by name, where the Jinja engine would take "gemma" as template text).
            .args(["--chat-template", "gemma", "--no-jinja"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        LlamaServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub async fn ready(&self) {
        for _ in 0..600 {
            if let Ok(mut c) = Client::connect(self.addr).await {
                if c.get("/health").await.is_ok_and(|r| r.status == 200) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("llama-server never became ready");
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
