//! A keep-alive HTTP/1 client (plain or TLS) and its whole-read responses: shared by the
//! end-to-end tests (`tests/common`) and the load harnesses (`benches/harness`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1 connection.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        Self::connect_with(addr, None).await
    }

    /// Connects over HTTPS, trusting only the CA in `ca`.
    pub async fn connect_tls(addr: SocketAddr, ca: &Path) -> std::io::Result<Client> {
        let config = meshd::tls::client_config(ca).map_err(std::io::Error::other)?;
        Self::connect_with(addr, Some(&config)).await
    }

    async fn connect_with(
        addr: SocketAddr,
        tls: Option<&std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> std::io::Result<Client> {
        let stream = meshd::tls::connect(&addr.ip().to_string(), addr.port(), tls).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Client { sender, addr })
    }

    /// Sends one request; returns the response with its body not yet read (for streams).
    pub async fn start(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
        self.sender.ready().await.map_err(|e| e.to_string())?;
        self.sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Resp, String> {
        let resp = self.start(method, path, body, headers).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub async fn post(&mut self, path: &str, body: &str) -> Result<Resp, String> {
        self.send("POST", path, body.as_bytes(), &[]).await
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp, String> {
        self.send("GET", path, b"", &[]).await
    }
}
