//! Load harness for `POST /math/add-two-numbers` through `meshd up` (gateway → caller → gateway →
//! infer → gateway `state::incr` with a durable flush → back), next to a bare hyper "hello"
//! server measured in the same run: the ceiling for a loopback HTTP request on this machine.
//!
//! A second `meshd up` exports every span over OTLP/HTTP (to a sink on loopback that answers
//! 200), a third samples 1% of requests (`parentbased_traceidratio`, `0.01`): the `math+otlp` and
//! `math+otlp1%` rows give the cost of OpenTelemetry export, as ratios to `math` measured in the
//! same run.
//!
//! `cargo bench --bench load_math` (env `SECONDS`, default 5 per point).

mod harness;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use harness::{drive, Up};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

async fn hello_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn main() {
    let secs: f64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let errors = rt.block_on(async {
        let mut errors = 0;
        let up = Arc::new(Up::start(&["--slots", "1"]));
        up.ready().await;
        let hello = hello_server().await;
        let sink = format!("http://{}", hello_server().await);
        let traced = Up::start_env(
            &["--slots", "1"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", sink.as_str())],
        );
        traced.ready().await;
        let sampled = Up::start_env(
            &["--slots", "1"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", sink.as_str()),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            ],
        );
        sampled.ready().await;
        println!("load_math: {secs} s per point, 2 cores shared by client and server");
        println!(
            "{:<10} {:>4} {:>10} {:>9} {:>9} {:>7} {:>14}",
            "target", "c", "req/s", "p50 ms", "p99 ms", "errors", "vs hello"
        );
        for conc in [1usize, 32] {
            let h = drive(hello, "/", b"", conc, secs).await;
            let math = |addr| {
                drive(
                    addr,
                    "/math/add-two-numbers",
                    br#"{"a": 1, "b": 2}"#,
                    conc,
                    secs,
                )
            };
            // The sampled server before the fully traced one: the latter's exporter thread goes
            // on sending its backlog for a while after its run, on the same cores.
            let m = math(up.addr).await;
            let s = math(sampled.addr).await;
            let t = math(traced.addr).await;
            println!(
                "otlp export at c={conc}: {:.1}% of the req/s without it; sampling 1%: {:.1}%",
                100.0 * t.rps / m.rps,
                100.0 * s.rps / m.rps
            );
            for (name, p) in [
                ("hello", &h),
                ("math", &m),
                ("math+otlp", &t),
                ("otlp1%", &s),
            ] {
                println!(
                    "{name:<10} {conc:>4} {:>10.0} {:>9.2} {:>9.2} {:>7} {:>13.1}%",
                    p.rps,
                    p.p50,
                    p.p99,
                    p.errors,
                    100.0 * p.rps / h.rps
                );
                errors += p.errors;
            }
        }
        errors
    });
    // A figure measured over failed requests means nothing: say so, and fail.
    if errors > 0 {
        eprintln!("load_math: {errors} requests failed; the figures above are not valid");
        std::process::exit(1);
    }
}
