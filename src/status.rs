//! `meshd status`: asks a gateway for its live functions and workers and prints them as a table.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Fetches `GET /status` from the gateway at `url` (`http://` or `https://` with `ca`).
pub async fn fetch(url: &str, api_key: Option<&str>, ca: Option<&Path>) -> anyhow::Result<Value> {
    let (secure, host, port) = crate::tls::endpoint(url, "https").map_err(anyhow::Error::msg)?;
    let tls = match (secure, ca) {
        (true, Some(ca)) => Some(crate::tls::client_config(ca)?),
        (true, None) => {
            anyhow::bail!("an https:// gateway needs --ca (the CA that signed its certificate)")
        }
        (false, _) => None,
    };
    let io = crate::tls::connect(&host, port, tls.as_ref()).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get("/status").header("host", host.as_str());
    if let Some(key) = api_key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&body)?;
    if !status.is_success() {
        let msg = value["error"]["message"]
            .as_str()
            .unwrap_or("unexpected answer");
        anyhow::bail!("{url}/status answered {status}: {msg}");
    }
    Ok(value)
}

/// The table `meshd status` prints.
pub fn render(status: &Value) -> String {
    let mut rows = vec![(
        "FUNCTION".to_string(),
        "IN FLIGHT".to_string(),
        "WORKERS (in flight / served)".to_string(),
    )];
    for f in status["functions"].as_array().into_iter().flatten() {
        let workers: Vec<String> = f["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                format!(
                    "{}#{} ({} / {}){}{}",
                    w["name"].as_str().unwrap_or("?"),
                    w["id"],
                    w["inflight"],
                    w["served"],
                    if w["draining"] == true {
                        " draining"
                    } else {
                        ""
                    },
                    if w["stalled"] == true { " STALLED" } else { "" }
                )
            })
            .collect();
        rows.push((
            f["function"].as_str().unwrap_or("?").to_string(),
            f["inflight"].to_string(),
            workers.join(", "),
        ));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let mut out: String = rows
        .iter()
        .map(|(a, b, c)| format!("{a:<w0$}  {b:>w1$}  {c}\n"))
        .collect();
    // Each worker once, with the gateways it says it is joined to.
    let mut joined = std::collections::BTreeMap::new();
    for f in status["functions"].as_array().into_iter().flatten() {
        for w in f["workers"].as_array().into_iter().flatten() {
            let gateways: Vec<&str> = w["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !gateways.is_empty() {
                let name = format!("{}#{}", w["name"].as_str().unwrap_or("?"), w["id"]);
                joined.insert(name, gateways.join(", "));
            }
        }
    }
    if !joined.is_empty() {
        let w = joined.keys().map(String::len).max().unwrap_or(0).max(6);
        out.push_str(&format!("\n{:<w$}  JOINED GATEWAYS\n", "WORKER"));
        for (name, gateways) in joined {
            out.push_str(&format!("{name:<w$}  {gateways}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_one_row_per_function() {
        let v = serde_json::json!({"functions": [
            {"function": "math::add", "inflight": 1, "workers": [
                {"name": "infer", "id": 2, "inflight": 1, "served": 10, "draining": false},
                {"name": "infer-b", "id": 3, "inflight": 0, "served": 9, "draining": true},
                {"name": "infer-c", "id": 4, "inflight": 0, "served": 1, "draining": false, "stalled": true,
                 "gateways": ["10.0.0.1:49134", "10.0.0.2:49134"]}]}]});
        let text = super::render(&v);
        assert!(text.lines().nth(1).unwrap().starts_with("math::add"));
        assert!(
            text.contains(
                "infer#2 (1 / 10), infer-b#3 (0 / 9) draining, infer-c#4 (0 / 1) STALLED"
            ),
            "{text}"
        );
        assert!(
            text.contains("infer-c#4  10.0.0.1:49134, 10.0.0.2:49134"),
            "{text}"
        );
    }
}
